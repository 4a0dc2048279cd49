"""`inspector refit PRODUCT [--promote]`: a candidate version from the shots plus the station's evidence.

The evidence is what operators decided at the station (and what `inspector feedback import`
recorded): confirmed normals and confirmed defects
(:meth:`inspector.station.service.StationService.refit`). The candidate is saved as a new,
immutable version; it becomes active only with ``--promote`` (else `inspector promote`, or a
shadow run first). Prints the new version id and the before/after table on the evidence: before =
the active version's scores, after = the candidate's held-out (cross-validated) scores.
"""

from __future__ import annotations

import argparse
import json

from inspector.cli.commands._common import actor, add_data_dir, add_device, fmt, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refit", help="build a candidate version from the shots plus the operators' evidence",
                       description="Fit a candidate version of PRODUCT on its shots plus the evidence recorded at "
                                   "the station (confirmed normals and defects), re-calibrate its thresholds on "
                                   "held-out scores, save it as a new version and print the before/after table. "
                                   "The active version is unchanged unless --promote.")
    p.add_argument("product")
    p.add_argument("--promote", action="store_true", help="make the candidate the active version at once")
    p.add_argument("--actor", default=None, help="who refits (audit trail; default: the OS user)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_data_dir(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inspector.errors import CommandError

    st = service_from_args(args)
    try:
        st.registry.get(args.product)  # unknown product: clear error before loading the evidence
        bar, progress = _progress_bar(args)
        try:
            out = st.refit(args.product, actor=actor(args), progress=progress, promote=args.promote)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            if bar is not None:
                bar.stop()
    finally:
        close = getattr(st, "close", None)
        if close is not None:
            close()
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    ev = out["evidence"]
    state = "promoted: now the active version" if out["promoted"] else \
        f"not active (inspector promote {args.product} {out['version']})"
    print(f"{args.product}: candidate version {out['version']} from {out['parent']} on {ev.get('normal', 0)} "
          f"confirmed normal(s) and {ev.get('defect', 0)} confirmed defect(s) in {out['seconds']:.1f} s; {state}")
    if out.get("skipped_missing"):
        print(f"  {out['skipped_missing']} piece(s) of evidence skipped: their image is no longer kept")
    print(table_text(out["table"]))
    sel = out.get("selection")
    if sel:
        print(f"  selection: {selection_text(sel)}")
    return 0


def _progress_bar(args):
    if args.no_progress or args.json:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from inspector.products.progress import StageProgress

    bar = Progress(TextColumn(f"[bold]refit {args.product}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True))
    task = bar.add_task("", total=1.0)
    bar.start()
    return bar, StageProgress(lambda frac, what: bar.update(task, completed=frac, description=what),
                              spans=StageProgress.REFIT_SPANS)


def table_text(table: dict) -> str:
    """The before/after table as aligned text."""
    rows = [("", "before", "after"),
            ("image AUROC", *(_pct(table[s]["auroc"]) for s in ("before", "after"))),
            ("false alarms (normals not OK)", *(_pct(table[s]["false_alarm_rate"]) for s in ("before", "after"))),
            ("missed defects (defects not NG)", *(_pct(table[s]["missed_rate"]) for s in ("before", "after"))),
            ("evidence (normal / defect)", *(f"{table[s]['n_normal']} / {table[s]['n_defect']}"
                                             for s in ("before", "after")))]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {a:<{w}}  {b:>9}  {c:>9}" for a, b, c in rows)


def selection_text(sel: dict) -> str:
    on = sel.get("enabled") or {}
    parts = [f"{k} {'on' if v else 'off'}" for k, v in on.items()]
    return (", ".join(parts) or "-") + (f" ({sel['reason']})" if sel.get("reason") else "")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%" if isinstance(v, float) else fmt(v)
