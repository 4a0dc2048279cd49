"""`inspector feedback import|show`: labels made elsewhere become evidence; evidence counts.

``import PRODUCT FILE.csv``: a QA lab's re-inspection (columns ``path,label`` with ``good`` or
``defect``, optional ``operator,reason,mask``) is inspected with the active version and recorded
as decided parts (:meth:`inspector.station.service.StationService.import_feedback`). A malformed
CSV is refused with its line number and nothing is imported.
``show PRODUCT``: the product's evidence per label and per version that made the verdict, and what
was decided since the active version (what ``inspector refit`` would add).
"""

from __future__ import annotations

import argparse
import json

from inspector.cli.commands._common import actor, add_data_dir, add_device, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("feedback", help="import labelled parts as evidence; show a product's evidence",
                       description="Operator decisions and labels made elsewhere are the evidence a refit learns "
                                   "from. `import` records a CSV of labelled images (path,label[,operator,reason,"
                                   "mask]; label good or defect); `show` counts a product's evidence.")
    add_data_dir(p)
    ps = p.add_subparsers(dest="action", metavar="ACTION")
    ps.required = True
    imp = ps.add_parser("import", help="inspect and record the labelled images of a CSV as evidence")
    imp.add_argument("product")
    imp.add_argument("csv", metavar="FILE.csv", help="columns path,label (good|defect), optional operator,reason,mask; "
                                                     "relative paths are relative to the CSV")
    imp.add_argument("--actor", default=None, help="who imports (default operator and audit; default: the OS user)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_device(imp)
    show = ps.add_parser("show", help="evidence per label and per product version")
    show.add_argument("product")
    show.add_argument("--json", action="store_true")
    for sp in (imp, show):
        add_data_dir(sp, nested=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    st = service_from_args(args)
    try:
        return _import(st, args) if args.action == "import" else _show(st, args)
    finally:
        st.close()


def _import(st, args) -> int:
    bar = None
    progress = None
    if not args.no_progress and not args.json:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]import {task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=Console(stderr=True))
        task = None

        def progress(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                bar.start()
                task = bar.add_task(args.product, total=total)
            bar.update(task, completed=done)

    try:
        out = st.import_feedback(args.product, args.csv, actor=actor(args), progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    lab = out["labels"]
    print(f"imported {out['imported']} labelled part(s) into {out['product']} (scored by version {out['version']}): "
          f"{lab['normal']} confirmed normal, {lab['defect']} confirmed defect")
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(out["verdicts"].items()))
    print(f"  the active version said: {verdicts}; it agreed with the label on {out['model_agreed']} of {out['imported']}")
    print(f"  next: `inspector feedback show {out['product']}`, `inspector refit {out['product']}`")
    return 0


def _show(st, args) -> int:
    s = st.feedback_summary(args.product)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"evidence of {s['product']} (active version {s['active_version']})")
    for c in ("version", "normal", "defect"):
        t.add_column(c, justify="left" if c == "version" else "right")
    for ver, n in sorted(s["by_version"].items()):
        mark = " (active)" if ver == s["active_version"] else ""
        t.add_row(ver + mark, str(n["normal"]), str(n["defect"]))
    t.add_row("[bold]all[/]", f"[bold]{s['labels']['normal']}[/]", f"[bold]{s['labels']['defect']}[/]")
    t.add_row("since active", str(s["since_active"]["normal"]), str(s["since_active"]["defect"]))
    con = Console()
    if s["total"]:
        con.print(t)
    else:
        print(f"no evidence for {s['product']} yet: decide parts at the station or `inspector feedback import`")
        return 0
    notes = []
    if s["with_mask"]:
        notes.append(f"{s['with_mask']} defect(s) with a painted mask")
    if s["images_missing"]:
        notes.append(f"{s['images_missing']} whose image is no longer kept (a refit skips them)")
    if s["labels"]["defect"] < s["min_defects"]:
        notes.append(f"fewer than {s['min_defects']} confirmed defects: a refit switches on no optional part of the detector")
    for n in notes:
        print(f"  {n}")
    return 0
