"""`inspector history`: recent inspections from the store."""

from __future__ import annotations

import argparse
import json

from inspector.cli.commands._common import add_data_dir, fmt, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("history", help="recent inspections (newest first)",
                       description="Inspections recorded in the store, newest first, with filters.")
    p.add_argument("--product", "-p", default=None)
    p.add_argument("--verdict", default=None, type=str.upper, choices=("OK", "UNCERTAIN", "NG", "ERROR"))
    p.add_argument("--batch", default=None, metavar="BATCH_ID", help="only rows of this batch")
    p.add_argument("--limit", type=int, default=50, help="rows to show (default 50; 0 = all)")
    p.add_argument("--json", action="store_true", help="JSON lines")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    st = service_from_args(args)
    rows = st.store.history(product=args.product, verdict=args.verdict, batch_id=args.batch,
                            limit=args.limit if args.limit and args.limit > 0 else None)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        return 0
    if not rows:
        print("no inspections recorded" + (" matching the filters" if any(
            (args.product, args.verdict, args.batch)) else ""))
        return 0
    from rich.console import Console
    from rich.table import Table

    colours = {"OK": "green", "UNCERTAIN": "yellow", "NG": "red", "ERROR": "bright_black"}
    reviewed = any(r["decision"] for r in rows)
    t = Table(title=f"{len(rows)} inspection(s), newest first (times UTC)")
    cols = ["id", "time", "product", "verdict", "score", "source"] + (["decision"] if reviewed else []) + ["error"]
    for c in cols:
        t.add_column(c, overflow="fold", no_wrap=c in ("id", "time", "verdict"))
    for r in rows:
        v = r["verdict"] or "-"
        cells = [str(r["id"]), f"{r['created_at']:%m-%d %H:%M:%S}", r["product"],
                 f"[{colours.get(v, 'white')}]{v}[/]", fmt(r["score"], 4), r["source"]]
        if reviewed:
            cells.append((r["decision"] or "") + (f" ({r['operator']})" if r["operator"] else ""))
        t.add_row(*cells, r["error"] or "")
    Console().print(t)
    return 0
