"""Product registry: a few normal shots -> a fitted, calibrated detector saved on disk.

A product is a folder ``<root>/<name>/``::

    product.json               what the product is (detector, backbone, thresholds, calibration,
                               version); written last, atomically: the commit point of every change
    state-<model_hash>.safetensors / .json    the detector state (safetensors + JSON, no pickle)
    shots/<sha16>.png          the registered normal shots (refits; MuSc's reference set)

Files are written under new names first and ``product.json`` is replaced atomically
(write-then-rename) at the end, so a crash at any moment leaves either the old product or the new
one, never a mix. Unreferenced files are removed after the commit.

Registration (:meth:`ProductRegistry.register`):

1. fit the detector on the normal shots (GraphCore by default);
2. calibrate the two thresholds (:func:`inspector.verdict.calibrate`) from *held-out* scores:
   each shot is scored by a model fitted without it (leave-one-out, up to 8 folds), together with
   ``N_VIEWS`` re-shot views of it (:func:`augmented_view`: rotation up to 2 degrees, sub-pixel
   shift, +-5% brightness/contrast); with a single shot, only the views are scored, by the full
   model. Generated defects (:func:`inspector.synth.generate_defects`, ``n_synthetic`` of them,
   drawn from the shots, severities spread over [0, 1]; weight-free or a trained diffusion
   ``generator``) are scored by the same held-out models, so normal and defect scores are
   comparable; the fraction passed as OK per severity band is recorded;
3. save. ``version`` is a content hash of the detector state, its configuration, the backbone and
   the thresholds: any change that can change a verdict changes the version.

Detectors by kind:

* fitted (GraphCore, PatchCore): as above;
* zero-shot (AnomalyCLIP): no fit; shots, views and defects are scored by the one model;
* batch-wise (MuSc): the shots are kept as a *reference set*; an incoming image is scored together
  with them (mutual scoring). Held-out scores score each shot against the others.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from inspector.detectors.base import AnomalyResult, detector_class
from inspector.inspection import Inspection, as_rgb8_list, inspections_from
from inspector.io import read_image, to_rgb8
from inspector.paths import NAME_RE
from inspector.state import atomic_write_bytes, atomic_write_json, bytes_sha256, safetensors_bytes
from inspector.verdict import Thresholds, Verdict, calibrate

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "graphcore"
MAX_SHOTS = 32
MAX_FOLDS = 8
N_VIEWS = 3
#: Registration progress callback: ``progress(stage, done, total)``.
Progress = Callable[[str, int, int], None]
#: The stages ``register`` reports, in order ("generated defects" interleaves with the folds).
REGISTER_STAGES = ("held-out scoring", "generated defects", "fit", "save")


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    """Call ``progress`` if given; a failing callback (a closed browser tab) never stops a registration."""
    if progress is None:
        return
    try:
        progress(stage, int(done), int(total))
    except Exception:  # noqa: BLE001
        log.debug("progress callback failed", exc_info=True)
FORMAT = 1


class ProductNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "product not found"


class ProductExists(ValueError):
    pass


class RuntimeUnavailable(RuntimeError):
    """The requested inference runtime (e.g. ``onnx``) cannot serve this product here."""


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return os.environ.get("USER", "unknown")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _shot_id(rgb: np.ndarray) -> str:
    return bytes_sha256(rgb.tobytes() + str(rgb.shape).encode())


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


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
    path: Path | None = None
    _registry: ProductRegistry | None = field(default=None, repr=False, compare=False)

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
        }

    @classmethod
    def from_json(cls, d: dict, path: Path | None = None) -> Product:
        return cls(
            name=d["name"], detector=d["detector"], backbone=d["backbone"],
            thresholds=Thresholds.from_dict(d["thresholds"]), version=d["version"],
            calibration=d.get("calibration", {}), shots=int(d.get("shots", len(d.get("shot_files", [])))),
            created=d.get("created", ""), updated=d.get("updated", ""), image_size=int(d.get("image_size", 0)),
            detector_config=d.get("detector_config", {}), model_hash=d.get("model_hash", ""),
            shot_files=list(d.get("shot_files", [])), registration=d.get("registration", {}), path=path,
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


def product_version(model_hash: str, detector: str, backbone: str, image_size: int, thresholds: Thresholds) -> str:
    """Content hash of everything that decides a verdict."""
    return bytes_sha256(_canon({"model": model_hash, "detector": detector, "backbone": backbone,
                        "image_size": image_size, "thresholds": thresholds.to_dict()}))[:16]


# ----------------------------------------------------------------------------------------------
# Held-out views for calibration
# ----------------------------------------------------------------------------------------------
def augmented_view(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible re-shot of a normal part: rotation up to 2 degrees, a shift of up to 3 pixels
    (sub-pixel, so not GraphCore's integer-shift augmentation) and a +-5% brightness/contrast
    change. No added sensor noise: on smooth parts it alone moves CNN patch features more than
    most real defects do, which would push the OK threshold above the defects."""
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-2, 2)), 1.0)
    m[:, 2] += rng.uniform(-3, 3, size=2)
    out = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    out = out.astype(np.float32) * float(rng.uniform(0.95, 1.05)) + float(rng.uniform(-6, 6))
    return np.clip(out, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Runtime: a loaded detector serving one product
# ----------------------------------------------------------------------------------------------
class TorchRuntime:
    """Backbone + detector for one product version. Scoring is serialised by a lock (one model,
    many threads: the station's parallel users, GPU work one batch at a time).

    ``mode``: ``fit`` / ``zero`` score images independently; ``mutual`` (MuSc) scores each image
    together with the product's reference shots (:meth:`score_tensor`) or a whole set
    (:meth:`score_set`, used by folder batches).
    """

    def __init__(self, backbone, detector, mode: str, ref_images: list[np.ndarray] | None = None):
        self.backbone = backbone
        self.detector = detector
        self.mode = mode
        self.lock = threading.Lock()
        self.ref_x = backbone.preprocess(ref_images) if mode == "mutual" and ref_images else None
        self._refs = None
        self.resize = backbone.preprocess.resize  # RGB -> model input size (no normalisation)

    @property
    def size(self) -> int:
        return self.backbone.preprocess.size

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.backbone.preprocess(images)

    @torch.inference_mode()
    def extract(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Backbone features ``{layer: [B,h,w,C]}`` (CPU) and image-level features (or None)."""
        if hasattr(self.detector, "extract"):
            feats, glob = self.detector.extract(x)
        else:
            feats, glob = self.backbone.embed(x), None
        return {k: v.cpu() for k, v in feats.items()}, (None if glob is None else glob.cpu())

    def refs(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if self._refs is None:
            if self.ref_x is None:
                self._refs = ({}, None)
            else:
                self._refs = self.extract(self.ref_x)
        return self._refs

    @torch.inference_mode()
    def score_set(self, feats: dict[str, torch.Tensor], glob: torch.Tensor | None = None, with_refs: bool = True):
        """Mutual scoring of a set of extracted images (plus the reference shots, which are
        scored too and dropped): results for ``feats``' images only."""
        if not hasattr(self.detector, "score_features"):
            raise RuntimeUnavailable(f"{self.detector.name} cannot score a feature set (no score_features)")
        rf, rg = self.refs() if with_refs else ({}, None)
        n_ref = next(iter(rf.values())).shape[0] if rf else 0
        if n_ref:
            feats = {k: torch.cat([rf[k], feats[k]]) for k in feats}
            glob = None if glob is None or rg is None else torch.cat([rg, glob])
        with self.lock:
            res = self.detector.score_features(feats, (self.size, self.size), image_features=glob).cpu()
        return AnomalyResult(res.maps[n_ref:], res.scores[n_ref:])

    @torch.inference_mode()
    def score_tensor(self, x: torch.Tensor) -> AnomalyResult:
        """Scores of a preprocessed batch. Mutual products score each image with the reference set."""
        if self.mode != "mutual":
            with self.lock:
                return self.detector.score(x).cpu()
        feats, glob = self.extract(x)
        out = []
        for j in range(x.shape[0]):
            one = {k: v[j:j + 1] for k, v in feats.items()}
            out.append(self.score_set(one, None if glob is None else glob[j:j + 1]))
        return AnomalyResult.cat(out)


class OnnxAdapter:
    """The product's exported graph on onnxruntime (:mod:`inspector.deploy.runtime`), behind the
    :class:`TorchRuntime` face used by inspection and batches (images scored independently)."""

    mode = "fit"

    def __init__(self, runner):
        self.runner = runner
        self.preprocess = runner.preprocess
        self.resize = runner.preprocess.resize
        self.size = runner.size

    @classmethod
    def load(cls, prod: Product, registry: ProductRegistry) -> OnnxAdapter:
        try:
            from inspector.deploy.runtime import load_runtime
        except ImportError as exc:
            raise RuntimeUnavailable(f"the onnx runtime is not installed here ({exc}); use --runtime torch") from exc
        try:
            from inspector.deploy.export import NotExportableError
        except ImportError:  # pragma: no cover - same package
            NotExportableError = ValueError  # noqa: N806
        if _mode(detector_class(prod.detector)) == "mutual":
            raise RuntimeUnavailable(f"product {prod.name!r} uses {prod.detector}, which scores images against "
                                     "each other and cannot run as an ONNX graph; use --runtime torch")
        device = None if registry.device is None else str(registry.device)
        try:
            return cls(load_runtime(prod, "onnx", registry=registry, device=device))
        except NotExportableError as exc:
            raise RuntimeUnavailable(f"product {prod.name!r} cannot run on onnx: {exc}") from exc

    def score_tensor(self, x: torch.Tensor) -> AnomalyResult:
        return self.runner.score(x).cpu()


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
        :data:`REGISTER_STAGES` ("held-out scoring" once per fold, "generated defects" per defect
        made, "fit", "save"), so a caller can show where it is and estimate the time left."""
        d = self._dir(name)
        shots = self._validate_shots(images)
        if (d / "product.json").is_file() and not replace:  # fail before minutes of fitting
            raise ProductExists(f"product {name!r} already exists; delete it, add shots, or register with replace")
        prod, blob, config = self._build(name, shots, detector, backbone, n_synthetic, seed, image_size,
                                         detector_config or {}, generator, progress=progress)
        _report(progress, "save", 0, 1)
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
        _report(progress, "save", 1, 1)
        return self.get(name)

    def add_shots(self, name: str, images: list[np.ndarray], actor: str | None = None) -> Product:
        """Add normal shots and refit; thresholds are recalibrated (the audit keeps the old ones)."""
        new = self._validate_shots(images, allow_more=True)
        with self._locked():
            old = self.get(name)
            shots = old.shot_images()
            have = {_shot_id(s) for s in shots}
            added = [s for s in new if _shot_id(s) not in have]
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

        cls = detector_class(detector)
        if not image_size and hasattr(cls, "default_image_size"):
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
        _report(progress, "fit", 0, 1)
        if mode == "fit":
            _fit(det, bb.preprocess(shots), fit_gen)
        _report(progress, "fit", 1, 1)
        normal, defects, severities, map_low = self._calibration_scores(cls, bb, cfg, shots, mode, n_synthetic,
                                                                        seed, gen, fit_gen, progress=progress,
                                                                        final=det)
        tensors, config = det.state()
        blob = safetensors_bytes(tensors)
        model_hash = bytes_sha256(blob + _canon(config) + _canon([_shot_id(s) for s in shots]))[:16]
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

    def _calibration_scores(self, cls, bb, cfg, shots, mode, n_synthetic, seed, gen=None, fit_gen=None,
                            progress=None, final=None):
        """Held-out normal scores, generated-defect scores, the defects' severities (stratified over
        [0, 1] across all folds) and the median normal pixel score.

        Each fold refits what depends on the shots (memory bank, scales) without the held-out shot.
        Learned weights (GraphCore's head) are taken from ``final`` when the detector can reuse them:
        the head saw generated defects on every shot, so a fold's defect scores can be slightly
        optimistic; its normal views are still scored against a bank without them."""
        from inspector.synth import _resolve, generate_defects
        from inspector.synth.severity import draw_severities

        gen = _resolve(None) if gen is None else gen
        # separate streams: the held-out normal views do not depend on the generator or on n_synthetic
        rng = np.random.default_rng(seed)
        rng_def = np.random.default_rng([seed, 1])
        all_sev = draw_severities(n_synthetic, rng_def, None)
        k = len(shots)
        folds = list(range(min(k, MAX_FOLDS)))
        per_fold = [n_synthetic // len(folds) + (1 if i < n_synthetic % len(folds) else 0) for i in range(len(folds))]
        normal: list[float] = []
        defects: list[float] = []
        severities: list[float] = []
        lows: list[float] = []
        shared = None
        if mode == "zero":
            shared = cls(bb, **cfg)
        _report(progress, "held-out scoring", 0, len(folds))
        made = 0
        for i, n_def in zip(folds, per_fold):
            others = [s for j, s in enumerate(shots) if j != i] or [shots[i]]
            queries_normal = ([shots[i]] if (k > 1 or mode == "zero") else []) + \
                [augmented_view(shots[i], rng) for _ in range(N_VIEWS)]
            sev = all_sev[len(severities):len(severities) + n_def]
            severities += [float(v) for v in sev]
            queries_defect = [img for img, _ in generate_defects([shots[i]], n_def, rng_def, gen, severity=sev)] \
                if n_def else []
            made += n_def
            _report(progress, "generated defects", made, n_synthetic)
            if mode == "fit":
                det = _fit(cls(bb, **cfg), bb.preprocess(others if k > 1 else shots), fit_gen, reuse=final)
                rt = TorchRuntime(bb, det, "fit")
            elif mode == "zero":
                rt = TorchRuntime(bb, shared, "zero")
            else:
                rt = TorchRuntime(bb, cls(bb, **cfg), "mutual", ref_images=others)
            res = rt.score_tensor(bb.preprocess(queries_normal + queries_defect))
            s = res.scores.tolist()
            normal += s[:len(queries_normal)]
            defects += s[len(queries_normal):]
            lows.append(float(res.maps[:len(queries_normal)].median()))
            _report(progress, "held-out scoring", i + 1, len(folds))
        return [float(v) for v in normal], [float(v) for v in defects], severities, float(np.median(lows))

    def _commit(self, prod: Product, shots: list[np.ndarray], blob: bytes, config: dict) -> None:
        """Write shots + state under new names, then product.json atomically, then clean up."""
        from inspector.io import write_image

        d = self._dir(prod.name)
        (d / "shots").mkdir(parents=True, exist_ok=True)
        files = []
        for s in shots:
            rel = f"shots/{_shot_id(s)[:16]}.png"
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
    to reuse, each only when the detector's fit accepts it."""
    import inspect

    try:
        params = inspect.signature(det.fit).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {}
    if generator is not None and "generator" in params:
        kwargs["generator"] = generator
    if reuse is not None and "reuse_head_of" in params:
        kwargs["reuse_head_of"] = reuse
    return det.fit(x, **kwargs)


def _mode(cls) -> str:
    if getattr(cls, "batchwise", False):
        return "mutual"
    return "fit" if getattr(cls, "needs_fit", True) else "zero"


__all__ = [
    "DEFAULT_DETECTOR",
    "Inspection",
    "MAX_SHOTS",
    "Product",
    "ProductExists",
    "ProductNotFound",
    "ProductRegistry",
    "RuntimeUnavailable",
    "augmented_view",
    "product_version",
]
