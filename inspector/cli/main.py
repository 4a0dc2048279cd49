"""`inspector` command line. Each subcommand lives in its own module under
``inspector/cli/commands/`` exposing ``register(subparsers)``; they are discovered here, so adding a
command never touches this file.

Exit codes: 0 success, 1 runtime failure (e.g. bad data), 2 usage error, 3 missing weights,
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from inspector.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_WEIGHTS, CommandError, InspectorError


def build_parser() -> argparse.ArgumentParser:
    from inspector.cli import commands

    parser = argparse.ArgumentParser(prog="inspector", description="Industrial visual inspection station.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = parser.parse_args(argv)
    from inspector.backbones.registry import MissingWeightsError
    from inspector.io import ImageError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MissingWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WEIGHTS
    except (InspectorError, CommandError, ImageError, FileNotFoundError, KeyError, ValueError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return getattr(exc, "code", EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
