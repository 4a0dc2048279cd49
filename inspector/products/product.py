"""What a product is: the :class:`Product` record saved as ``product.json``, its version rule and
the product errors.

A product is a folder ``<root>/<name>/``::

    product.json               the *active* version's record (what the product is: detector,
                               backbone, thresholds, calibration, version) plus its activation
                               ``history`` and the ``shadow`` candidate; written last, atomically:
                               the commit point of every change
    versions/<version>.json    every version ever made, immutable (the same record + parent,
                               origin: action, actor, evidence used, before/after table)
    state-<model_hash>.safetensors / .json    the detector state (safetensors + JSON, no pickle),
                               kept while any version refers to it
    shots/<sha16>.png          the registered normal shots (refits; MuSc's reference set)
    refs/<sha16>.png           confirmed normals a MuSc version adds to its reference set

``version`` (:func:`product_version`) is a content hash of the detector state, its configuration,
the backbone and the thresholds: any change that can change a verdict changes the version. The
registry (:mod:`inspector.products.registry`) writes and reads these folders; version files and
the history are :mod:`inspector.products.versions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspector.errors import InspectorError
from inspector.inspection import Inspection
from inspector.io import read_image
from inspector.state import bytes_sha256
from inspector.verdict import Thresholds, Verdict

#: Version of the ``product.json`` layout.
FORMAT = 1


class ProductNotFound(InspectorError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "product not found"


class ProductExists(InspectorError, ValueError):
    pass


class RuntimeUnavailable(InspectorError, RuntimeError):
    """The requested inference runtime (e.g. ``onnx``) cannot serve this product here."""


def canonical_json(obj: Any) -> bytes:
    """Key-sorted, compact JSON: the bytes hashed into versions and model hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def product_version(model_hash: str, detector: str, backbone: str, image_size: int, thresholds: Thresholds) -> str:
    """Content hash of everything that decides a verdict."""
    return bytes_sha256(canonical_json({"model": model_hash, "detector": detector, "backbone": backbone,
                                        "image_size": image_size, "thresholds": thresholds.to_dict()}))[:16]


@dataclass
class Product:
    name: str
    detector: str
    backbone: str
    thresholds: Thresholds
    version: str
    calibration: dict
    shots: int
    created: str
    updated: str
    image_size: int = 0
    detector_config: dict = field(default_factory=dict)
    model_hash: str = ""
    shot_files: list[str] = field(default_factory=list)
    registration: dict = field(default_factory=dict)
    #: the version this one was made from (None: a first registration, or a pre-versions product)
    parent: str | None = None
    #: confirmed normals a mutual (MuSc) version scores with, beside its shots (``refs/<sha16>.png``)
    reference_files: list[str] = field(default_factory=list)
    #: how the version was made: ``action``, ``actor``, ``at``, the ``evidence`` used (counts and
    #: ``items``: sha256 + label) and the before/after ``table`` of a refit
    origin: dict = field(default_factory=dict)
    path: Path | None = None
    #: the :class:`~inspector.products.registry.ProductRegistry` that loaded it (serves inspect)
    _registry: Any = field(default=None, repr=False, compare=False)

    # -- convenience ----------------------------------------------------------------------------
    @property
    def map_low(self) -> float:
        """Typical pixel score of a normal image (0 of the display scale)."""
        return float(self.calibration.get("map_low", 0.0))

    def decide(self, score: float) -> Verdict:
        return self.thresholds.decide(score)

    def inspect(self, images: list[np.ndarray] | np.ndarray, runtime: str = "torch") -> list[Inspection]:
        """Score RGB uint8 images (any sizes); maps come back at each image's own size."""
        if self._registry is None:
            raise RuntimeError("product not attached to a registry; use ProductRegistry.get()")
        return self._registry.inspect(self, images, runtime=runtime)

    def load_detector(self):
        """The fitted detector object (loaded once per process and product version)."""
        if self._registry is None:
            raise RuntimeError("product not attached to a registry; use ProductRegistry.get()")
        return self._registry.runtime(self, "torch").detector

    def shot_images(self) -> list[np.ndarray]:
        return [read_image(self.path / f) for f in self.shot_files]

    def reference_images(self) -> list[np.ndarray]:
        """What a mutual (MuSc) version scores an image with: its shots and its confirmed normals."""
        return [read_image(self.path / f) for f in self.shot_files + self.reference_files]

    @property
    def ref(self) -> str:
        """``name@version``: this very version, wherever a product name is accepted."""
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "detector": self.detector,
            "backbone": self.backbone,
            "image_size": self.image_size,
            "detector_config": self.detector_config,
            "thresholds": self.thresholds.to_dict(),
            "calibration": self.calibration,
            "shots": self.shots,
            "shot_files": self.shot_files,
            "model_hash": self.model_hash,
            "version": self.version,
            "registration": self.registration,
            "created": self.created,
            "updated": self.updated,
            "parent": self.parent,
            "reference_files": self.reference_files,
            "origin": self.origin,
        }

    @classmethod
    def from_json(cls, d: dict, path: Path | None = None) -> Product:
        return cls(
            name=d["name"], detector=d["detector"], backbone=d["backbone"],
            thresholds=Thresholds.from_dict(d["thresholds"]), version=d["version"],
            calibration=d.get("calibration", {}), shots=int(d.get("shots", len(d.get("shot_files", [])))),
            created=d.get("created", ""), updated=d.get("updated", ""), image_size=int(d.get("image_size", 0)),
            detector_config=d.get("detector_config", {}), model_hash=d.get("model_hash", ""),
            shot_files=list(d.get("shot_files", [])), registration=d.get("registration", {}),
            parent=d.get("parent"), reference_files=list(d.get("reference_files", [])), origin=d.get("origin", {}),
            path=path,
        )

    def summary(self) -> dict:
        cal = self.calibration
        return {
            "name": self.name, "detector": self.detector, "backbone": self.backbone,
            "image_size": self.image_size, "shots": self.shots, "version": self.version,
            "ok_below": self.thresholds.ok_below, "ng_above": self.thresholds.ng_above,
            "normal_max": max(cal.get("normal_scores") or [float("nan")]),
            "defect_min": min(cal.get("defect_scores") or [float("nan")]),
            "updated": self.updated,
        }


__all__ = ["FORMAT", "Product", "ProductExists", "ProductNotFound", "RuntimeUnavailable",
           "canonical_json", "product_version"]
