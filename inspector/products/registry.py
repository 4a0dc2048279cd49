"""Product registry: a few normal shots -> a fitted, calibrated detector saved on disk.

The folder layout and the version rule are in :mod:`inspector.products.product`. Files are
written under new names first and ``product.json`` is replaced atomically (write-then-rename) at
the end, so a crash at any moment leaves either the old product or the new one, never a mix.
Unreferenced files are removed after the commit.

Registration (:meth:`ProductRegistry.register`):

1. fit the detector on the normal shots (GraphCore by default);
2. calibrate the two thresholds (:func:`inspector.verdict.calibrate`) from *held-out* scores
   (:mod:`inspector.products.calibration`); the fraction of generated defects passed as OK per
   severity band is recorded;
3. save.

Detectors by kind:

* fitted (GraphCore, PatchCore): as above;
* zero-shot (AnomalyCLIP): no fit; shots, views and defects are scored by the one model;
* batch-wise (MuSc): the shots are kept as a *reference set*; an incoming image is scored together
  with them (mutual scoring). Held-out scores score each shot against the others.

The model serving a product is cached here, one per product model and runtime kind
(:mod:`inspector.products.runtime`).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspector.detectors.base import AnomalyResult, capabilities_of
from inspector.detectors.registry import detector_class, product_detector_class
from inspector.inspection import Inspection, as_rgb8_list, inspections_from
from inspector.io import read_image, to_rgb8
from inspector.paths import NAME_RE
from inspector.products.calibration import held_out_scores
from inspector.products.product import (
    Product,
    ProductExists,
    ProductNotFound,
    RuntimeUnavailable,
    canonical_json,
    product_version,
)
from inspector.products.progress import Progress, report_progress
from inspector.products.runtime import OnnxAdapter, TorchRuntime
from inspector.state import (
    array_sha256,
    atomic_write_bytes,
    atomic_write_json,
    bytes_sha256,
    safetensors_bytes,
)
from inspector.verdict import Thresholds, calibrate

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "graphcore"
MAX_SHOTS = 32


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return os.environ.get("USER", "unknown")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
class ProductRegistry:
    """Products under ``root`` (normally ``<data_dir>/products``). Changes go to ``store``'s audit."""

    def __init__(self, root: str | os.PathLike, store=None, device: str | torch.device | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.device = device
        self._runtimes: dict[tuple, Any] = {}
        self._rt_lock = threading.Lock()
        self.cleaned = self._clean_stale()

    #: temporary files elsewhere (e.g. an ONNX export beside the product) are written outside the
    #: registry lock: they are removed only once this old
    STALE_TMP_S = 3600.0

    def _clean_stale(self) -> list[Path]:
        """Remove what a crash (``kill -9`` during register, add_shots, set_thresholds or delete)
        left behind: temporary files and half-deleted trash folders. Those are written only under
        the registry lock, which is held here, so no live writer loses a file; other temporary
        files are removed only when older than :attr:`STALE_TMP_S`. Returns what was removed."""
        removed: list[Path] = []
        now = time.time()
        with self._locked():
            for d in self.root.iterdir():
                try:
                    if d.name.startswith(".deleted-") and d.is_dir():
                        shutil.rmtree(d, ignore_errors=True)
                        removed.append(d)
                        continue
                    if d.name.startswith(".") or not d.is_dir() or d.is_symlink():
                        continue
                    for f in d.rglob(".*"):
                        if not (f.name.endswith(".tmp") or f.name.startswith(".tmp-")) or not f.is_file():
                            continue
                        under_lock = f.parent == d or f.parent == d / "shots"
                        if under_lock or now - f.stat().st_mtime > self.STALE_TMP_S:
                            f.unlink(missing_ok=True)
                            removed.append(f)
                except OSError as exc:
                    log.warning("could not clean %s: %s", d, exc)
        if removed:
            log.info("removed %d stale temporary file(s) left by an interrupted write", len(removed))
        return removed

    # -- locking & paths ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """Serialise registry changes across threads and processes."""
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _dir(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid product name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        return self.root / name

    def _audit(self, actor, action, product, details) -> None:
        if self.store is not None:
            self.store.audit(actor=actor or default_actor(), action=action, product=product, details=details)

    # -- read -----------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return (self._dir(name) / "product.json").is_file()

    def get(self, name: str) -> Product:
        d = self._dir(name)
        path = d / "product.json"
        if not path.is_file():
            known = ", ".join(p.name for p in self.list()) or "none"
            raise ProductNotFound(f"unknown product {name!r} (registered: {known})")
        prod = Product.from_json(json.loads(path.read_text()), path=d)
        prod._registry = self
        return prod

    def list(self) -> list[Product]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "product.json").is_file():
                try:
                    out.append(self.get(d.name))
                except Exception as exc:  # a damaged product must not hide the others
                    log.warning("skipping unreadable product %s: %s", d.name, exc)
        return out

    # -- register / update ----------------------------------------------------------------------
    def register(self, name: str, images: list[np.ndarray], detector: str = DEFAULT_DETECTOR,
                 backbone: str = "efficientnet-lite0", actor: str | None = None, n_synthetic: int = 16,
                 seed: int = 0, *, image_size: int | None = None, detector_config: dict | None = None,
                 replace: bool = False, generator: Any = None, progress: Progress | None = None) -> Product:
        """Fit, calibrate and save a product from 1..MAX_SHOTS normal images (RGB uint8 arrays or paths).

        ``generator`` (None = weight-free, or a trained diffusion generator / its folder / its name
        under ``models/synth``) makes the calibration defects, and is passed to the detector's
        ``fit`` when that accepts ``generator``; the product records its name and version.

        ``progress(stage, done, total)`` is called as registration advances, with the stages
        :data:`~inspector.products.progress.REGISTER_STAGES` ("held-out scoring" once per fold,
        "generated defects" per defect made, "fit", "save"), so a caller can show where it is and
        estimate the time left."""
        d = self._dir(name)
        shots = self._validate_shots(images)
        if (d / "product.json").is_file() and not replace:  # fail before minutes of fitting
            raise ProductExists(f"product {name!r} already exists; delete it, add shots, or register with replace")
        prod, blob, config = self._build(name, shots, detector, backbone, n_synthetic, seed, image_size,
                                         detector_config or {}, generator, progress=progress)
        report_progress(progress, "save", 0, 1)
        with self._locked():  # fitted outside the lock; only the existence check + commit inside
            old = self.get(name) if (d / "product.json").is_file() else None
            if old is not None and not replace:
                raise ProductExists(f"product {name!r} was registered meanwhile by someone else")
            if old is not None:
                prod.created = old.created
            self._commit(prod, shots, blob, config)
            self._audit(actor, "register" if old is None else "re-register", name,
                        {"detector": detector, "backbone": backbone, "shots": len(shots),
                         "version": prod.version, "thresholds": prod.thresholds.to_dict(),
                         "previous_version": old.version if old else None})
        report_progress(progress, "save", 1, 1)
        return self.get(name)

    def add_shots(self, name: str, images: list[np.ndarray], actor: str | None = None) -> Product:
        """Add normal shots and refit; thresholds are recalibrated (the audit keeps the old ones)."""
        new = self._validate_shots(images, allow_more=True)
        with self._locked():
            old = self.get(name)
            shots = old.shot_images()
            have = {array_sha256(s) for s in shots}
            added = [s for s in new if array_sha256(s) not in have]
            if not added:
                raise ValueError("all given shots are already registered for this product")
            shots = shots + added
            if len(shots) > MAX_SHOTS:
                raise ValueError(f"a product takes at most {MAX_SHOTS} shots ({len(shots)} given)")
            reg = old.registration
            prod, blob, config = self._build(name, shots, old.detector, old.backbone,
                                             int(reg.get("n_synthetic", 16)), int(reg.get("seed", 0)),
                                             old.image_size, old.detector_config,
                                             (reg.get("generator") or {}).get("path"))
            prod.created = old.created
            self._commit(prod, shots, blob, config)
            self._audit(actor, "add_shots", name, {"added": len(added), "shots": len(shots),
                                                   "previous_version": old.version, "version": prod.version,
                                                   "previous_thresholds": old.thresholds.to_dict(),
                                                   "thresholds": prod.thresholds.to_dict()})
        return self.get(name)

    def set_thresholds(self, name: str, thresholds: Thresholds | dict | tuple, actor: str | None = None) -> Product:
        """New thresholds without refitting (the version changes: verdicts may change)."""
        if isinstance(thresholds, dict):
            thresholds = Thresholds.from_dict(thresholds)
        elif isinstance(thresholds, (tuple, list)):
            thresholds = Thresholds(*thresholds)
        with self._locked():
            old = self.get(name)
            prod = dc_replace(old, thresholds=thresholds, updated=_now(),
                           version=product_version(old.model_hash, old.detector, old.backbone, old.image_size,
                                                   thresholds))
            atomic_write_json(old.path / "product.json", prod.to_json())
            self._audit(actor, "set_thresholds", name, {"previous": old.thresholds.to_dict(),
                                                        "thresholds": thresholds.to_dict(),
                                                        "previous_version": old.version, "version": prod.version})
        return self.get(name)

    def delete(self, name: str, actor: str | None = None) -> None:
        with self._locked():
            prod = self.get(name)
            trash = self.root / f".deleted-{name}-{int(time.time() * 1000)}"
            os.replace(prod.path, trash)  # atomic: the product is gone at once
            shutil.rmtree(trash, ignore_errors=True)
            with self._rt_lock:
                for key in [k for k in self._runtimes if k[0] == name]:
                    del self._runtimes[key]
            self._audit(actor, "delete", name, {"version": prod.version, "detector": prod.detector,
                                                "shots": prod.shots})

    # -- internals ------------------------------------------------------------------------------
    @staticmethod
    def _validate_shots(images, allow_more: bool = False) -> list[np.ndarray]:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        shots = [read_image(im) if not isinstance(im, np.ndarray) else to_rgb8(im, f"shot {i}")
                 for i, im in enumerate(images)]
        if not shots:
            raise ValueError("registration needs at least one normal image")
        if len(shots) > MAX_SHOTS and not allow_more:
            raise ValueError(f"a product takes at most {MAX_SHOTS} shots ({len(shots)} given)")
        return shots

    def _load_backbone(self, name: str, image_size: int | None):
        from inspector.backbones.registry import load_backbone

        return load_backbone(name, device=self.device, image_size=image_size or None)

    def _build(self, name, shots, detector, backbone, n_synthetic, seed, image_size, cfg, generator=None,
               progress=None):
        """Fit + calibrate, no disk writes: ``(Product, state safetensors bytes, state config)``."""
        from inspector.synth import _resolve, describe_generator

        cls = product_detector_class(detector)
        if not image_size and capabilities_of(cls).default_image_size:
            image_size = cls.default_image_size(backbone, cfg)  # official presets: 518 px on ViT-L-14-336
        bb = self._load_backbone(backbone, image_size)
        size = bb.preprocess.size
        t0 = time.perf_counter()
        mode = _mode(cls)
        gen_info = describe_generator(generator)
        gen = _resolve(generator)
        fit_gen = None if generator is None else gen  # None: the detector's own default
        # the final model first: detectors with learned weights lend them to the held-out folds
        det = cls(bb, **cfg)
        report_progress(progress, "fit", 0, 1)
        if mode == "fit":
            _fit(det, bb.preprocess(shots), fit_gen)
        report_progress(progress, "fit", 1, 1)
        normal, defects, severities, map_low = held_out_scores(
            shots, self._fold_runtimes(cls, bb, cfg, mode, fit_gen, final=det), n_synthetic=n_synthetic, seed=seed,
            gen=gen, zero_shot=mode == "zero", progress=progress)
        tensors, config = det.state()
        blob = safetensors_bytes(tensors)
        model_hash = bytes_sha256(blob + canonical_json(config) + canonical_json([array_sha256(s) for s in shots]))[:16]
        auto = calibrate(normal, defects)
        from inspector.synth.severity import severity_bands

        now = _now()
        prod = Product(
            name=name, detector=detector, backbone=backbone, thresholds=auto,
            version=product_version(model_hash, detector, backbone, size, auto),
            calibration={"normal_scores": normal, "defect_scores": defects, "defect_severity": severities,
                         "severity_bands": severity_bands(severities, defects, auto.ok_below, auto.ng_above),
                         "map_low": map_low, "auto_thresholds": auto.to_dict(),
                         "method": ("held-out: leave-one-out folds + augmented views" if mode != "zero"
                                    else "zero-shot: shots + augmented views")
                         + f"; defects: {gen_info['kind']} generator ({gen_info['name']}), severities spread 0-1"},
            shots=len(shots), created=now, updated=now, image_size=size, detector_config=cfg,
            model_hash=model_hash, shot_files=[],
            registration={"n_synthetic": n_synthetic, "seed": seed, "seconds": round(time.perf_counter() - t0, 3),
                          "mode": mode, "device": str(bb.device), "generator": gen_info},
        )
        return prod, blob, config

    @staticmethod
    def _fold_runtimes(cls, bb, cfg, mode, fit_gen=None, final=None):
        """``fold_runtime(others)`` for :func:`~inspector.products.calibration.held_out_scores`: the
        model of one calibration fold, built from the shots other than the held-out one.

        Each fold refits what depends on the shots (memory bank, scales) without the held-out shot.
        Learned weights (GraphCore's head) are taken from ``final`` when the detector can reuse them:
        the head saw generated defects on every shot, so a fold's defect scores can be slightly
        optimistic; its normal views are still scored against a bank without them. Zero-shot
        detectors share one model; batch-wise ones take the other shots as their reference set."""
        shared = cls(bb, **cfg) if mode == "zero" else None

        def fold_runtime(others: list[np.ndarray]) -> TorchRuntime:
            if mode == "fit":
                return TorchRuntime(bb, _fit(cls(bb, **cfg), bb.preprocess(others), fit_gen, reuse=final), "fit")
            if mode == "zero":
                return TorchRuntime(bb, shared, "zero")
            return TorchRuntime(bb, cls(bb, **cfg), "mutual", ref_images=others)

        return fold_runtime

    def _commit(self, prod: Product, shots: list[np.ndarray], blob: bytes, config: dict) -> None:
        """Write shots + state under new names, then product.json atomically, then clean up."""
        from inspector.io import write_image

        d = self._dir(prod.name)
        (d / "shots").mkdir(parents=True, exist_ok=True)
        files = []
        for s in shots:
            rel = f"shots/{array_sha256(s)[:16]}.png"
            if not (d / rel).is_file():
                tmp = d / "shots" / f".tmp-{os.getpid()}-{threading.get_ident()}.png"
                write_image(tmp, s)
                os.replace(tmp, d / rel)
            files.append(rel)
        prod.shot_files = files
        stem = d / f"state-{prod.model_hash}"
        atomic_write_bytes(stem.with_suffix(".safetensors"), blob)
        atomic_write_json(stem.with_suffix(".json"), config)
        atomic_write_json(d / "product.json", prod.to_json())  # commit point
        keep = {"product.json", f"{stem.name}.safetensors", f"{stem.name}.json", "shots"}
        for p in d.iterdir():
            if p.name not in keep and p.name.startswith("state-"):
                p.unlink(missing_ok=True)
        for p in (d / "shots").iterdir():
            if f"shots/{p.name}" not in files:
                p.unlink(missing_ok=True)

    # -- inference ------------------------------------------------------------------------------
    def runtime(self, prod: Product, kind: str = "torch"):
        """The loaded model serving ``prod`` (cached per product model and runtime kind)."""
        key = (prod.name, prod.model_hash, kind)
        with self._rt_lock:
            rt = self._runtimes.get(key)
            if rt is None:
                rt = self._load_runtime(prod, kind)
                for k in [k for k in self._runtimes if k[0] == prod.name and k[2] == kind]:
                    del self._runtimes[k]  # an older model of this product
                self._runtimes[key] = rt
        return rt

    def _load_runtime(self, prod: Product, kind: str):
        if kind == "onnx":
            if _mode(detector_class(prod.detector)) == "mutual":
                raise RuntimeUnavailable(f"product {prod.name!r} uses {prod.detector}, which scores images against "
                                         "each other and cannot run as an ONNX graph; use --runtime torch")
            return OnnxAdapter.load(prod, self)
        if kind != "torch":
            raise ValueError(f"unknown runtime {kind!r}; choose torch or onnx")
        from inspector.state import load_state

        cls = detector_class(prod.detector)
        bb = self._load_backbone(prod.backbone, prod.image_size)
        tensors, config = load_state(prod.path / f"state-{prod.model_hash}", device=str(bb.device))
        det = cls.from_state(bb, tensors, config)
        mode = _mode(cls)
        return TorchRuntime(bb, det, mode, ref_images=prod.shot_images() if mode == "mutual" else None)

    def score(self, prod: Product, images: list[np.ndarray], runtime: str = "torch") -> tuple[AnomalyResult, float]:
        """Raw result at the model's input resolution for validated RGB images, and ms per image."""
        rt = self.runtime(prod, runtime)
        t0 = time.perf_counter()
        res = rt.score_tensor(rt.preprocess(images))
        return res, (time.perf_counter() - t0) * 1e3 / max(1, len(images))

    def inspect(self, prod: Product, images, runtime: str = "torch") -> list[Inspection]:
        images = as_rgb8_list(images)
        if not images:
            return []
        res, ms = self.score(prod, images, runtime)
        return inspections_from(images, res.maps.numpy(), res.scores.tolist(), prod.thresholds, ms)


def _fit(det, x: torch.Tensor, generator=None, reuse=None):
    """``det.fit(x)``, passing the defect generator and a fitted detector whose learned weights
    to reuse, each only when the detector declares it (``capabilities.fit_options``)."""
    options = capabilities_of(det).fit_options
    kwargs = {}
    if generator is not None and "generator" in options:
        kwargs["generator"] = generator
    if reuse is not None and "reuse_head_of" in options:
        kwargs["reuse_head_of"] = reuse
    return det.fit(x, **kwargs)


def _mode(cls) -> str:
    return capabilities_of(cls).mode


__all__ = ["DEFAULT_DETECTOR", "MAX_SHOTS", "ProductRegistry", "default_actor"]
