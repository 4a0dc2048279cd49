"""`inspector shadow PRODUCT [VERSION | --stop]`: run a candidate version beside the active one.

With a VERSION, every later inspection of PRODUCT (station, Live, line, local batch) is also scored
by that version on a background worker; verdicts and PLC outputs stay the active version's. With
no VERSION, print the running tally and the latest disagreements (what the Learning screen shows).
"""

from __future__ import annotations

import argparse
import json

from inspector.cli.commands._common import actor, add_data_dir, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shadow", help="run a candidate version in shadow, stop it, or show its tally",
                       description="Start (VERSION), stop (--stop) or show (neither) the shadow candidate of PRODUCT. "
                                   "A shadow version scores every inspection a second time without changing any "
                                   "verdict; the operators' later decisions settle who was right.")
    p.add_argument("product")
    p.add_argument("version", nargs="?", default=None, help="a version id (or unique prefix) from `inspector versions`")
    p.add_argument("--stop", action="store_true", help="stop shadow scoring for PRODUCT")
    p.add_argument("--limit", type=int, default=10, help="disagreements listed (default 10)")
    p.add_argument("--actor", default=None, help="who changes it (audit trail; default: the OS user)")
    p.add_argument("--json", action="store_true")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.stop and args.version:
        raise ValueError("give a VERSION to start shadow scoring or --stop to end it, not both")
    st = service_from_args(args)
    if args.stop or args.version:
        st.set_shadow(args.product, None if args.stop else args.version, actor=actor(args))
        now = st.registry.shadow_version(args.product)
        print(f"{args.product}: shadow " + (f"version {now}" if now else "stopped"))
        return 0
    version = st.registry.shadow_version(args.product)
    tally = st.shadow_tally(args.product) if version else {}
    rows = st.disagreements(args.product, limit=args.limit) if version else []
    if args.json:
        print(json.dumps({"version": version, "tally": tally, "disagreements": rows}, default=str, indent=2))
        return 0
    if version is None:
        print(f"{args.product}: no shadow version (start one with `inspector shadow {args.product} VERSION`)")
        return 0
    print(f"{args.product}: shadow version {version}")
    for key, value in tally.items():
        print(f"  {key:<24} {value}")
    for r in rows:
        print(f"  inspection {r['id']} ({r['source']}): active {r['verdict']} {r['score']:.4g}, "
              f"candidate {r['shadow_verdict']} {r['shadow_score']:.4g}"
              + (f", operator {r['decision']}" if r.get("decision") else ""))
    return 0
