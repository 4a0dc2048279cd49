"""`inspector rollback PRODUCT`: back to the previously active version, instantly (no refit)."""

from __future__ import annotations

import argparse

from inspector.cli.commands._common import actor, add_data_dir, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollback", help="make the previously active version of a product active again",
                       description="Undo the last activation of PRODUCT (a promote, refit --promote, add-shots, "
                                   "set-thresholds or rollback): the version active before it is active again, at "
                                   "once, with its own model and thresholds. Recorded in the audit trail.")
    p.add_argument("product")
    p.add_argument("--actor", default=None, help="who rolls back (audit trail; default: the OS user)")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    st = service_from_args(args)
    before = st.registry.get(args.product).version
    p = st.registry.rollback(args.product, actor=actor(args))
    print(f"{p.name}: rolled back from {before} to version {p.version}")
    return 0
