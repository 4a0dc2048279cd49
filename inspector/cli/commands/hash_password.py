"""`inspector hash-password`: a salted scrypt hash for the station's ``[users]`` table."""

from __future__ import annotations

import argparse
import getpass
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hash-password", help="print a salted scrypt hash for the [users] table",
                       description="Reads the password (twice) from the terminal, or one line from stdin when "
                                   "it is not a terminal, and prints `scrypt$...` for station.toml's [users].")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inspector.errors import CommandError
    from inspector.security.passwords import hash_password

    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            raise CommandError("the two passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise CommandError("empty password")
    print(hash_password(pw))
    return 0
