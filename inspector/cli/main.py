"""`inspector` command line. Each subcommand lives in its own module under
``inspector/cli/commands/`` exposing ``register(subparsers)``; they are discovered here, so adding a
command never touches this file.

Commands from above the library register themselves by data, not by import: every entry point in
the group ``inspector.commands`` (``pyproject.toml``) names a ``register(subparsers)`` function.
That is how the web station's ``inspector serve`` (``app.serve:register``) joins the command line
while the library never imports ``app/``.

Exit codes: 0 success, 1 runtime failure (e.g. bad data), 2 usage error, 3 missing weights,
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import pkgutil
import sys

from inspector.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_WEIGHTS, CommandError, InspectorError

#: Entry-point group of commands registered from outside ``inspector/cli/commands/``.
COMMANDS_GROUP = "inspector.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspector", description="Industrial visual inspection station.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _, register in sorted(_commands().items()):
        register(sub)
    return parser


def _commands() -> dict:
    """Command name -> ``register(subparsers)``: the modules in ``inspector/cli/commands/`` and the
    ``inspector.commands`` entry points, registered together in name order (as ``--help`` lists them)."""
    from inspector.cli import commands

    found = {mod.name: importlib.import_module(f"{commands.__name__}.{mod.name}").register
             for mod in pkgutil.iter_modules(commands.__path__) if not mod.name.startswith("_")}
    for ep in importlib.metadata.entry_points(group=COMMANDS_GROUP):
        if ep.name in found:
            continue  # a command of the library's own keeps its name
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not take every other command down
            print(f"warning: command {ep.name!r} ({ep.value}) not loaded: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
    return found


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
