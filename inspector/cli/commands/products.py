"""`inspector products [list|show|delete|set-thresholds|add-shots|audit]`: manage registered products."""

from __future__ import annotations

import argparse
import json

from inspector.cli.commands._common import (
    actor,
    add_data_dir,
    add_device,
    expand_images,
    fmt,
    service_from_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("products", help="list, show, update or delete registered products",
                       description="Manage registered products. Every change is recorded in the audit trail.")
    add_data_dir(p)
    ps = p.add_subparsers(dest="action", metavar="ACTION")
    lst = ps.add_parser("list", help="list products (default)")
    lst.add_argument("--json", action="store_true")
    show = ps.add_parser("show", help="show one product: thresholds, calibration, version, recent audit")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    dele = ps.add_parser("delete", help="delete a product (its inspections stay in the history)")
    dele.add_argument("name")
    dele.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    dele.add_argument("--actor", default=None)
    thr = ps.add_parser("set-thresholds", help="change the OK/NG thresholds without refitting")
    thr.add_argument("name")
    thr.add_argument("--ok-below", type=float, default=None, help="scores below this are OK")
    thr.add_argument("--ng-above", type=float, default=None, help="scores at or above this are NG")
    thr.add_argument("--auto", action="store_true", help="restore the thresholds calibrated at registration")
    thr.add_argument("--actor", default=None)
    add = ps.add_parser("add-shots", help="add normal images and refit (thresholds are recalibrated)")
    add.add_argument("name")
    add.add_argument("images", nargs="+", metavar="IMAGE")
    add.add_argument("--actor", default=None)
    add_device(add)
    aud = ps.add_parser("audit", help="the audit trail of registry changes")
    aud.add_argument("name", nargs="?", default=None)
    aud.add_argument("--limit", type=int, default=50)
    aud.add_argument("--json", action="store_true")
    for sp in (lst, show, dele, thr, add, aud):
        add_data_dir(sp, nested=True)
    p.set_defaults(func=run, action=None)


def run(args: argparse.Namespace) -> int:
    from inspector.errors import EXIT_USAGE, CommandError
    from inspector.verdict import Thresholds

    st = service_from_args(args)
    reg = st.registry
    action = args.action or "list"
    if action == "list":
        prods = reg.list()
        if getattr(args, "json", False):
            print(json.dumps([p.summary() for p in prods], indent=2))
            return 0
        if not prods:
            print(f"no products registered in {reg.root}")
            return 0
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"Products in {reg.root}")
        for c in ("name", "detector", "backbone", "px", "shots", "OK below", "NG at/above", "version"):
            t.add_column(c, overflow="fold")
        for p in prods:
            t.add_row(p.name, p.detector, p.backbone, str(p.image_size), str(p.shots), fmt(p.thresholds.ok_below, 4),
                      fmt(p.thresholds.ng_above, 4), p.version)
        Console().print(t)
        return 0
    if action == "show":
        p = reg.get(args.name)
        audit = st.store.audit_log(p.name, limit=10)
        if args.json:
            print(json.dumps({**p.to_json(), "audit": audit, "shadow": reg.shadow_version(p.name)}, indent=2,
                             default=str))
            return 0
        cal = p.calibration
        print(f"{p.name}  version {p.version}  ({p.path})")
        print(f"  detector {p.detector} on {p.backbone} @ {p.image_size}px, {p.shots} shot(s), "
              f"config {json.dumps(p.detector_config)}")
        print(f"  thresholds: OK below {fmt(p.thresholds.ok_below)}, NG at or above {fmt(p.thresholds.ng_above)}"
              f"  (calibrated: {fmt(cal.get('auto_thresholds', {}).get('ok_below'))} / "
              f"{fmt(cal.get('auto_thresholds', {}).get('ng_above'))})")
        ns, ds = cal.get("normal_scores", []), cal.get("defect_scores", [])
        if ns:
            print(f"  held-out normal scores ({len(ns)}): {fmt(min(ns))} .. {fmt(max(ns))}")
        if ds:
            print(f"  generated defect scores ({len(ds)}): {fmt(min(ds))} .. {fmt(max(ds))}")
        print(f"  created {p.created}, updated {p.updated}; inspections recorded: {st.store.count(product=p.name)}")
        sel = p.registration.get("selection")
        if sel:
            from inspector.cli.commands.refit import selection_text

            ev = sel.get("evidence") or {}
            print(f"  selection ({ev.get('normals', 0)} confirmed normal(s), {ev.get('defects', 0)} confirmed "
                  f"defect(s); rule {sel.get('rule', '-')}): {selection_text(sel)}")
            for c in sel.get("candidates") or []:
                print(f"    candidate {c.get('name')}: AUROC {fmt(c.get('auroc'), 4)}, separation "
                      f"{fmt(c.get('separation'), 4)}")
        ev_n, ev_d = cal.get("evidence_normal_scores"), cal.get("evidence_defect_scores")
        if ev_n is not None:
            print(f"  evidence held-out scores: {len(ev_n)} confirmed normal(s), {len(ev_d or [])} confirmed "
                  f"defect(s); thresholds from {cal.get('evidence_used', {}).get('defects', '-')}")
        table = (p.origin or {}).get("table")
        if table:
            from inspector.cli.commands.refit import table_text

            print(f"  made by refit from {p.parent}:")
            print(table_text(table))
        vers = reg.versions(p.name)
        shadow = next((v["version"] for v in vers if v["shadow"]), None)
        print(f"  versions: {len(vers)} (`inspector versions {p.name}`)" + (f"; shadow {shadow}" if shadow else ""))
        for a in audit:
            print(f"  audit {a['created_at']:%Y-%m-%d %H:%M:%S} {a['actor']}: {a['action']} {json.dumps(a['details'])}")
        return 0
    if action == "delete":
        reg.get(args.name)
        if not args.yes:
            answer = input(f"delete product {args.name!r}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("not deleted")
                return 1
        reg.delete(args.name, actor=actor(args))
        print(f"deleted {args.name}")
        return 0
    if action == "set-thresholds":
        p = reg.get(args.name)
        if args.auto:
            if args.ok_below is not None or args.ng_above is not None:
                raise CommandError("--auto cannot be combined with --ok-below/--ng-above", EXIT_USAGE)
            new = Thresholds.from_dict(p.calibration["auto_thresholds"])
        else:
            if args.ok_below is None and args.ng_above is None:
                raise CommandError("give --ok-below and/or --ng-above (or --auto)", EXIT_USAGE)
            new = Thresholds(p.thresholds.ok_below if args.ok_below is None else args.ok_below,
                             p.thresholds.ng_above if args.ng_above is None else args.ng_above)
        p = reg.set_thresholds(args.name, new, actor=actor(args))
        print(f"{p.name}: OK below {fmt(p.thresholds.ok_below)}, NG at or above {fmt(p.thresholds.ng_above)}; "
              f"version {p.version}")
        return 0
    if action == "add-shots":
        from inspector.io import read_image

        if getattr(args, "device", None):
            reg.device = args.device
        images = [read_image(x) for x in expand_images(args.images)]
        p = reg.add_shots(args.name, images, actor=actor(args))
        print(f"{p.name}: {p.shots} shots, refitted; OK below {fmt(p.thresholds.ok_below)}, NG at or above "
              f"{fmt(p.thresholds.ng_above)}; version {p.version}")
        return 0
    if action == "audit":
        rows = st.store.audit_log(args.name, limit=args.limit)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        for a in rows:
            print(f"{a['created_at']:%Y-%m-%d %H:%M:%S}  {a['actor']:12s} {a['action']:15s} {a['product'] or '-':20s} "
                  f"{json.dumps(a['details'])}")
        return 0
    raise CommandError(f"unknown action {action!r}", EXIT_USAGE)
