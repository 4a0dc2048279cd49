"""`inspector versions PRODUCT`: every version of a product, newest first (active and shadow marked)."""

from __future__ import annotations

import argparse
import json

from inspector.cli.commands._common import add_data_dir, fmt, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("versions", help="list a product's versions (newest first)",
                       description="Every version of PRODUCT, newest first: how it was made (register, add_shots, "
                                   "set_thresholds, refit), from which parent, by whom, on how much evidence, and "
                                   "a refit's before/after AUROC. '*' marks the active version, 'S' the shadow.")
    p.add_argument("product")
    p.add_argument("--json", action="store_true")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    st = service_from_args(args)
    rows = st.registry.versions(args.product)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for v in rows:
        mark = "*" if v["active"] else "S" if v["shadow"] else " "
        ev = v.get("evidence") or {}
        evs = f"evidence {ev.get('normal', 0)}n/{ev.get('defect', 0)}d" if ev else ""
        t = v.get("table") or {}
        auc = ""
        if t:
            b, a = (t.get("before") or {}).get("auroc"), (t.get("after") or {}).get("auroc")
            auc = f"AUROC {fmt(b, 3)} -> {fmt(a, 3)}"
        thr = v.get("thresholds") or {}
        print(f"{mark} {v['version']}  {v['created'][:19]}  {v['action']:14s} {v['actor'] or '-':12s} "
              f"parent {v['parent'] or '-':16s}  OK<{fmt(thr.get('ok_below'), 4)} NG>={fmt(thr.get('ng_above'), 4)}"
              f"  {evs}  {auc}".rstrip())
    return 0
