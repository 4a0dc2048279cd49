"""Options and helpers shared by the product/inspection commands (not a command itself)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_data_dir(p: argparse.ArgumentParser, nested: bool = False) -> None:
    """``nested``: on a sub-subcommand, so it must not overwrite the parent's value with a default."""
    p.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS if nested else None,
                   help="station data directory (default: $INSPECTOR_DATA or ./data)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: CUDA when present)")


def service_from_args(args: argparse.Namespace):
    """The station service over ``--data-dir`` and ``--device`` (each optional on a command)."""
    from inspector.station.service import StationService

    return StationService(getattr(args, "data_dir", None), device=getattr(args, "device", None))


def expand_images(items: list[str]) -> list[Path]:
    """Paths as given; folders expand to the image files inside them (sorted)."""
    from inspector.errors import CommandError
    from inspector.io import list_images

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise CommandError(f"no image files in folder {p}")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise CommandError(f"no such file or folder: {p}")
    return out


def fmt(v, digits: int = 6) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def actor(args: argparse.Namespace) -> str | None:
    return getattr(args, "actor", None) or os.environ.get("INSPECTOR_ACTOR")
