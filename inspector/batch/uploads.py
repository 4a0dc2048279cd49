"""Uploaded zips of images for a batch: unpacked within limits, and deleted once read.

An upload is hostile until shown otherwise: a zip may hold thousands of members, expand to many
gigabytes (a zip bomb) or name paths outside its folder (zip-slip). :func:`extract_zip` checks the
member count and the declared expanded size before writing anything, skips absolute paths, ``..``
and non-image members, and refuses a zip that holds no image. The limits are the station's
(``max_zip_members``, ``max_zip_bytes`` in :mod:`inspector.station.config`); the caller passes them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from inspector.errors import InspectorError
from inspector.io import is_image_file


class UploadError(InspectorError, ValueError):
    """An uploaded zip that cannot be used as a batch; the message is meant for the person who sent it."""


def extract_zip(path: str | os.PathLike, uploads: str | os.PathLike, *, max_members: int, max_bytes: int) -> Path:
    """Unpack the images of zip ``path`` into a new folder under ``uploads`` and return that folder."""
    dest = Path(uploads) / f"batch-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(f"Not a readable zip file: {exc}") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > max_members:
            raise UploadError(f"Zip holds {len(members)} files; the limit is {max_members}.")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise UploadError(f"Zip expands to {total / 1e6:.0f} MB; the limit is {max_bytes / 1e6:.0f} MB.")
        dest.mkdir(parents=True)
        n = 0
        for m in members:
            rel = Path(m.filename)
            if rel.is_absolute() or ".." in rel.parts or not is_image_file(rel):
                continue  # zip-slip and non-images are skipped
            target = dest / Path(*[p for p in rel.parts if p not in ("", ".")])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            n += 1
    if n == 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise UploadError("The zip holds no image files.")
    return dest


def drop_upload(path: str | os.PathLike | None, keep: bool = False) -> None:
    """Delete an uploaded file (the web framework's cached copy) once it has been read, unless
    ``keep``: an upload must not stay on disk after its batch."""
    if path and not keep:
        with contextlib.suppress(OSError):
            Path(path).unlink()


__all__ = ["UploadError", "drop_upload", "extract_zip"]
