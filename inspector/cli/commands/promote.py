"""`inspector promote PRODUCT VERSION`: make a version the active one (no refit: instant)."""

from __future__ import annotations

import argparse

from inspector.cli.commands._common import actor, add_data_dir, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="make a version of a product the active one",
                       description="Make VERSION (an id from `inspector versions`, or a unique prefix of it) the "
                                   "active version of PRODUCT. Instant: its model is on disk. Recorded in the "
                                   "audit trail; `inspector rollback` undoes it.")
    p.add_argument("product")
    p.add_argument("version")
    p.add_argument("--actor", default=None, help="who promotes (audit trail; default: the OS user)")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    st = service_from_args(args)
    before = st.registry.get(args.product).version
    p = st.registry.promote(args.product, args.version, actor=actor(args))
    if p.version == before:
        print(f"{p.name}: version {p.version} is already active")
    else:
        print(f"{p.name}: version {p.version} is now active (was {before})")
    return 0
