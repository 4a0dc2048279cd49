"""File names as text that any database can store, losslessly, and roots that confine paths.

POSIX file names are bytes. Python hands back the ones that are not UTF-8 as ``str`` with lone
surrogates (``surrogateescape``), which no UTF-8 database column accepts: one such name used to
fail its batch insert. :func:`encode_source` maps every ``str`` to storable text and
:func:`decode_source` maps it back exactly:

* a string that is valid UTF-8 and does not start with :data:`PREFIX` is stored as it is (every
  ordinary path, ``upload:...``, ``camera:...``), so existing rows and readable names are untouched;
* anything else is stored as ``PREFIX`` + the percent-encoded bytes (``os.fsencode``), e.g.
  ``pathbytes:/line/caf%E9.png``. The prefix branch is taken for every string that starts with
  the prefix, so the two branches never produce the same text: the mapping is injective.

:func:`within` is the confinement test used after symlink resolution (batch files, camera
folders): a path is inside a root when its resolved form is the root or lies below it.

The project's own places are stated here once: :func:`data_dir` (products, store, heatmaps,
evidence), :func:`models_dir` (weights; never inside site-packages) and :data:`NAME_RE` (the one
rule for product and user-visible names that become folder names).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote_from_bytes, unquote_to_bytes

PREFIX = "pathbytes:"

#: A product (or other user-chosen) name that becomes a folder name: always used with ``fullmatch``.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: The checkout this package was imported from, when it was (``pyproject.toml`` beside ``inspector/``).
_CHECKOUT = Path(__file__).resolve().parents[1]


def _in_checkout() -> bool:
    return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "inspector").is_dir()


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The station's data directory: ``explicit``, else ``$INSPECTOR_DATA``, else ``./data``."""
    return Path(explicit or os.environ.get("INSPECTOR_DATA") or "data")


def models_dir() -> Path:
    """Where weights live: ``$INSPECTOR_MODELS``; else ``models/`` of the checkout when the package
    runs from one (``pip install -e``, ``make``); else ``<data dir>/models``. Never a folder inside
    site-packages, which a wheel install would give and an upgrade would wipe."""
    env = os.environ.get("INSPECTOR_MODELS")
    if env:
        return Path(env).expanduser()
    if _in_checkout():
        return _CHECKOUT / "models"
    return data_dir().resolve() / "models"


def encode_source(text: str) -> str:
    """Storable, reversible text for ``text`` (see the module docstring)."""
    text = str(text)
    if not text.startswith(PREFIX):
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return PREFIX + quote_from_bytes(os.fsencode(text), safe="/:._-~ ")


def decode_source(stored: str) -> str:
    """Inverse of :func:`encode_source`: the original ``str`` (surrogates where the bytes were not
    UTF-8), ready for ``open`` or ``Path``."""
    if stored.startswith(PREFIX):
        return os.fsdecode(unquote_to_bytes(stored[len(PREFIX):]))
    return stored


def display(text: object) -> str:
    """Printable text for messages and terminals (never raises on a non-UTF-8 name; lossy)."""
    s = str(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s).decode("utf-8", "backslashreplace")


def within(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> bool:
    """True when ``path``, resolved (symlinks followed), is one of ``roots`` or lies below one."""
    p = Path(os.path.realpath(path))
    for root in roots:
        r = Path(os.path.realpath(Path(root).expanduser()))
        if p == r or r in p.parents:
            return True
    return False


__all__ = ["NAME_RE", "PREFIX", "data_dir", "decode_source", "display", "encode_source", "models_dir", "within"]
