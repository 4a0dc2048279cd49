"""Saved state: safetensors for tensors + a JSON sidecar for config. Never pickle.

Writes are atomic (write to a temporary name, fsync, rename) so a crash never leaves a
half-written product on disk. The one file hash (:func:`file_sha256`) and the one safetensors
writer (:func:`safetensors_bytes`) of the project live here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save
from torch import Tensor

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def bytes_sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def array_sha256(rgb: np.ndarray) -> str:
    """Content id of an image array: its bytes and its shape (names a shot file; identifies an
    array handed to the station, which has no file bytes to hash)."""
    return bytes_sha256(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode())


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The one safetensors serialisation: detached, CPU, contiguous tensors; ``format: pt``."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(clean, metadata={"format": "pt", **(metadata or {})})


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def save_state(path: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` atomically; returns the stem path."""
    stem = Path(path)
    atomic_write_bytes(stem.with_suffix(".safetensors"), safetensors_bytes(tensors))
    atomic_write_json(stem.with_suffix(".json"), config)
    return stem


def load_state(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    stem = Path(path)
    tensors = load_file(str(stem.with_suffix(".safetensors")), device=device)
    config = json.loads(stem.with_suffix(".json").read_text())
    return tensors, config


__all__ = ["array_sha256", "atomic_write_bytes", "atomic_write_json", "bytes_sha256", "file_sha256", "load_state", "safetensors_bytes",
           "save_state"]
