"""Evaluation on MVTec-layout folders: anomalib's metrics, the few-/zero-shot protocols, timing.

Data
    Any MVTec-layout folder: a root holding several classes (``root/<class>/{train/good,test/<type>,
    ground_truth/<type>/<stem>_mask.png}``: MVTec AD, VisA converted, the generated sample products)
    or one class folder. ``test/good`` images have label 0, every other ``test/<type>`` label 1.
    Pixel ground truth is known for good images (all zero) and for defect types with masks; defect
    types without a ``ground_truth/<type>`` folder (e.g. the textile product's ``local``/``global``)
    take part in the image metrics only, and pixel metrics use the images whose masks are known.
    A class with no masks at all reports image metrics only.

Metrics (anomalib 2.7 metric classes, :func:`compute_metrics`)
    image AUROC, image AP (anomalib ``AUPR``: the step-wise average precision, equal to sklearn's
    ``average_precision_score``), image F1-max, pixel AUROC, pixel AUPRO up to 30 % FPR (normalised
    by the limit, as in MVTec AD), pixel F1-max. Maps are compared with masks at the detector's
    input resolution (masks resized with nearest neighbour).

    Scores are min-max rescaled to [0, 1] (float64) before the metrics see them. This changes no
    ranking, and it is needed: torchmetrics' ROC, under anomalib's ``AUROC``, passes any input outside
    [0, 1] through a sigmoid, and in float32 the sigmoid of kNN distances such as 20 and 30 is 1.0
    for both, so raw distances give wrong AUROCs (0.5 instead of 1.0 on a perfectly separated
    example; see ``tests/test_evaluate.py``).

Protocols (:func:`evaluate`)
    few-shot (detectors with ``needs_fit``: GraphCore, the PatchCore-kNN baseline): for each k in
    ``shots`` and each seed, k images drawn from ``train/good`` (:func:`draw_shots`: seeded, and
    disjoint across seeds while ``train/good`` has enough images); fit on them, score the whole
    test split. Results are given
    as mean ± sample std over seeds (per class; the class mean is averaged per seed first).
    zero-shot (``needs_fit`` false: MuSc, AnomalyCLIP): one run per class; batch-wise detectors
    (MuSc) get all test images of the class at once as the mutual set.
    A detector that cannot run (missing weights or prompt checkpoint, too few train images) gives
    a row with status ``skipped`` and the reason; a crash gives ``failed`` with the error. The run
    goes on with the next detector.

Timing, in the same run
    backbone ms/image (``backbone.embed`` over the test split, after a warm-up), detector ms/image
    (``score`` wall time over the test split; includes its backbone pass), fit seconds, and peak
    memory during fit + score: CPU resident set size sampled every 2 ms, or CUDA
    ``max_memory_allocated``; reported as the rise above the level before the run, the absolute
    peak is in the JSON.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from inspector.data.mvtec import MVTecFolder, read_mvtec

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_aupro", "pixel_f1max")
METRICS = IMAGE_METRICS + PIXEL_METRICS
METRIC_LABELS = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_aupro": "AUPRO@30", "pixel_f1max": "P-F1max",
}
#: Extra detectors known to the evaluator only (baselines from other libraries).
BASELINES = ("anomalib-patchcore", "anomalib-patchcore-wrn50", "anomalib-winclip")
FEW_SHOT_DEFAULT = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------
# data


@dataclass
class ClassData:
    """One class (product) of an MVTec-layout folder; images are read on demand."""

    name: str
    folder: MVTecFolder

    @property
    def root(self) -> Path:
        return self.folder.root

    @property
    def train(self) -> list[Path]:
        return self.folder.train_good

    def test_items(self) -> list[tuple[Path, int, Path | None, str]]:
        return self.folder.test_items()

    @property
    def masked_types(self) -> list[str]:
        return self.folder.masked_types

    @property
    def unmasked_types(self) -> list[str]:
        return [t for t in self.folder.defect_types if t not in self.folder.masked_types]

    @property
    def has_masks(self) -> bool:
        return bool(self.masked_types)

    def describe(self) -> dict:
        items = self.test_items()
        return {
            "name": self.name, "root": str(self.root), "train_good": len(self.train),
            "test_good": sum(1 for it in items if it[1] == 0),
            "test_defect": sum(1 for it in items if it[1] == 1),
            "defect_types": self.folder.defect_types, "masked_types": self.masked_types,
            "unmasked_types": self.unmasked_types,
        }


def _is_class_dir(p: Path) -> bool:
    return (p / "test").is_dir() or (p / "train" / "good").is_dir()


def find_classes(root: str | os.PathLike, classes: Sequence[str] | None = None) -> list[ClassData]:
    """The classes under ``root`` (a dataset root with class folders, or one class folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if _is_class_dir(root):
        found = [ClassData(root.name, read_mvtec(root))]
    else:
        found = [ClassData(d.name, read_mvtec(d)) for d in sorted(root.iterdir())
                 if d.is_dir() and not d.name.startswith(".") and _is_class_dir(d)]
    if not found:
        raise FileNotFoundError(f"{root}: not an MVTec-layout folder (no <class>/test or test/ inside)")
    if classes:
        want = set(classes)
        missing = want - {c.name for c in found}
        if missing:
            raise FileNotFoundError(f"{root}: no class {', '.join(sorted(missing))}; found {', '.join(c.name for c in found)}")
        found = [c for c in found if c.name in want]
    for c in found:
        if not c.test_items():
            raise FileNotFoundError(f"{c.root}: no test images (test/<type>/*.png)")
    return found


def read_mask(path: str | os.PathLike | None, size: tuple[int, int]) -> np.ndarray:
    """Binary mask (bool, ``size`` = (H, W)), all False for ``None``; resized with nearest neighbour."""
    h, w = size
    if path is None:
        return np.zeros((h, w), bool)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        from inspector.io import ImageError

        raise ImageError(str(path), "mask is not a decodable image")
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return m > 0


@dataclass
class TestSet:
    """The test split of one class, read once and preprocessed for one backbone."""

    paths: list[Path]
    types: list[str]
    labels: np.ndarray           # [N] int 0/1
    x: Tensor                    # [N,3,S,S] preprocessed
    rgb: list[np.ndarray]        # resized RGB uint8 (what the network sees), for example plots
    mask_paths: list[Path | None]
    pixel_known: np.ndarray      # [N] bool: pixel ground truth known (good, or defect with mask)

    def __len__(self) -> int:
        return len(self.paths)

    def masks(self, size: tuple[int, int]) -> np.ndarray:
        return np.stack([read_mask(p, size) for p in self.mask_paths])


def load_test_set(data: ClassData, preprocess, max_test: int | None = None) -> TestSet:
    from inspector.io import read_image

    items = data.test_items()
    if max_test is not None and len(items) > max_test:
        # keep the good/defect proportions: a deterministic, evenly spaced subset
        idx = np.unique(np.linspace(0, len(items) - 1, max_test).round().astype(int))
        items = [items[i] for i in idx]
    images = [read_image(p) for p, *_ in items]
    rgb = [preprocess.resize(im) for im in images]
    masked = set(data.masked_types)
    return TestSet(
        paths=[p for p, *_ in items], types=[t for *_, t in items],
        labels=np.array([lab for _, lab, _, _ in items], dtype=np.int64),
        x=preprocess(images), rgb=rgb, mask_paths=[m for _, _, m, _ in items],
        pixel_known=np.array([lab == 0 or t in masked for _, lab, _, t in items], bool),
    )


def draw_shots(n_train: int, k: int, seed: int) -> list[int]:
    """Indices of ``k`` few-shot images out of ``n_train`` for ``seed`` (>= 0).

    A seeded permutation of ``train/good`` is cut into ``n_train // k`` blocks of ``k``; seed ``s``
    takes block ``s mod blocks`` of permutation ``default_rng(s // blocks)``. So seeds
    ``0 .. n_train//k - 1`` get disjoint shot sets (independent draws could repeat: with 16 images,
    seeds 0 and 2 both drew image 13 for k=1), and every seed is reproducible."""
    if k > n_train:
        raise ValueError(f"{k} shots requested but train/good has only {n_train} images")
    if k < 1 or seed < 0:
        raise ValueError(f"need k >= 1 and seed >= 0, got k={k}, seed={seed}")
    blocks = n_train // k
    perm = np.random.default_rng(seed // blocks).permutation(n_train)
    b = seed % blocks
    return sorted(int(i) for i in perm[b * k:(b + 1) * k])


# --------------------------------------------------------------------------------------------
# metrics


class _Fields:
    """The minimal batch object anomalib's ``AnomalibMetric.update`` reads its fields from."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def unit_scale(x: Tensor | np.ndarray) -> Tensor:
    """Min-max rescale to [0, 1] in float64 (rank-preserving; see module docstring)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu().double()
    lo, hi = t.min(), t.max()
    if not torch.isfinite(lo) or not torch.isfinite(hi):
        raise ValueError("scores contain NaN or inf")
    return (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)


def _anomalib(metric_cls, preds: Tensor, target: Tensor, fields=("pred_score", "gt_label"), **kw) -> float:
    m = metric_cls(fields=list(fields), **kw)
    m.update(_Fields(**{fields[0]: preds, fields[1]: target}))
    return float(m.compute())


def image_metrics(scores, labels) -> dict[str, float | None]:
    """Image AUROC, AP, F1-max with anomalib's ``AUROC``, ``AUPR``, ``F1Max``. ``None`` when the
    labels hold one class only (the metrics are undefined)."""
    from anomalib.metrics import AUPR, AUROC, F1Max

    y = torch.as_tensor(np.asarray(labels)).long().flatten()
    s = unit_scale(scores).flatten()
    if s.shape != y.shape:
        raise ValueError(f"{s.numel()} scores for {y.numel()} labels")
    if y.min() == y.max():
        return dict.fromkeys(IMAGE_METRICS)
    return {
        "image_auroc": _anomalib(AUROC, s, y),
        "image_ap": _anomalib(AUPR, s, y),
        "image_f1max": _anomalib(F1Max, s, y),
    }


def pixel_metrics(maps, masks, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Pixel AUROC, AUPRO (FPR up to ``fpr_limit``), F1-max with anomalib's ``AUROC``, ``AUPRO``,
    ``F1Max`` over ``maps`` / ``masks`` ``[N,H,W]``. ``None`` without defect or normal pixels."""
    from anomalib.metrics import AUPRO, AUROC, F1Max

    m = torch.as_tensor(np.asarray(masks)).bool()
    p = unit_scale(maps).float()  # float32 is exact enough for ranks of [0,1] maps, halves memory
    if p.shape != m.shape or p.ndim != 3:
        raise ValueError(f"maps {tuple(p.shape)} and masks {tuple(m.shape)} must both be [N,H,W]")
    if not m.any() or m.all():
        return dict.fromkeys(PIXEL_METRICS)
    f = ("anomaly_map", "gt_mask")
    return {
        "pixel_auroc": _anomalib(AUROC, p, m.long(), f),
        "pixel_aupro": _anomalib(AUPRO, p, m.to(torch.uint8), f, fpr_limit=fpr_limit),
        "pixel_f1max": _anomalib(F1Max, p, m.long(), f),
    }


def compute_metrics(scores, labels, maps=None, masks=None, pixel_known=None,
                    fpr_limit: float = 0.3) -> dict[str, float | None]:
    """All metrics. Pixel metrics only when ``maps`` and ``masks`` are given, over the images
    with ``pixel_known`` (default: all)."""
    out = image_metrics(scores, labels)
    if maps is None or masks is None:
        return {**out, **dict.fromkeys(PIXEL_METRICS)}
    maps = torch.as_tensor(np.asarray(maps)) if not isinstance(maps, Tensor) else maps
    masks = np.asarray(masks)
    if pixel_known is not None:
        keep = np.asarray(pixel_known, bool)
        maps, masks = maps[torch.from_numpy(keep)], masks[keep]
    if len(masks) == 0:
        return {**out, **dict.fromkeys(PIXEL_METRICS)}
    return {**out, **pixel_metrics(maps, masks, fpr_limit)}


# --------------------------------------------------------------------------------------------
# timing and memory


class PeakMemory:
    """Peak memory while the block runs: CUDA ``max_memory_allocated`` on a CUDA device, else the
    process resident set size sampled every ``interval`` s by a thread (torch releases the GIL in
    its kernels, so the sampler sees the working peak). ``.peak_mb`` absolute, ``.rise_mb`` above
    the level at entry."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.base = self.peak = 0
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # not Linux: lifetime peak from getrusage
            import resource

            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return r if platform.system() == "Darwin" else r * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self.rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def rise_mb(self) -> float:
        return max(0, self.peak - self.base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_backbone(backbone, x: Tensor, batch_size: int = 8) -> float:
    """ms/image of ``backbone.embed`` over ``x`` in batches, after a one-image warm-up."""
    dev = backbone.device
    backbone.embed(x[:1])
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        backbone.embed(x[i:i + batch_size])
    _sync(dev)
    return (time.perf_counter() - t0) * 1e3 / max(1, len(x))


# --------------------------------------------------------------------------------------------
# detectors


class SkipRun(RuntimeError):
    """A detector cannot run here (missing weights, too few images): recorded, not fatal."""


def resolve_detector(spec: str | type) -> tuple[str, type]:
    """``(name, class)`` for a registry name, an evaluator baseline, or a detector class."""
    if isinstance(spec, type):
        return getattr(spec, "name", spec.__name__), spec
    if spec in BASELINES:
        from inspector.detectors import baselines

        return spec, baselines.BASELINES[spec]
    from inspector.detectors.base import detector_class

    return spec, detector_class(spec)


def detector_backbone(name: str, cls: type, requested: str) -> str:
    """The backbone a detector runs on: the requested one, except for detectors tied to a family
    (AnomalyCLIP needs a CLIP backbone: ``cls.default_backbone`` or ``clip/ViT-L-14-336``)."""
    if name == "anomalyclip" or getattr(cls, "requires_clip", False):
        if not requested.startswith("clip/"):
            return getattr(cls, "default_backbone", "clip/ViT-L-14-336")
    if getattr(cls, "own_backbone", False):  # baselines that bring their own network
        return getattr(cls, "default_backbone", requested)
    return requested


def construct_detector(cls, backbone, config: dict[str, Any]):
    """``cls(backbone, **config)``; detectors whose weights are learned elsewhere (AnomalyCLIP's
    prompts) load them with ``cls.from_pretrained(config["checkpoint"] or default, backbone)``, so a
    missing checkpoint is a clear ``MissingWeightsError`` (reported as skipped), never a run with
    untrained prompts."""
    config = dict(config)
    if hasattr(cls, "from_pretrained") and not getattr(cls, "needs_fit", True):
        det = cls.from_pretrained(config.pop("checkpoint", None), backbone=backbone)
        for k, v in config.items():  # simple runtime options (e.g. chunk) only
            if not hasattr(det, k):
                raise ValueError(f"{getattr(cls, 'name', cls.__name__)}: unknown option {k!r} with a checkpoint")
            setattr(det, k, v)
        return det
    return cls(backbone, **config)


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


# --------------------------------------------------------------------------------------------
# runs


@dataclass
class RunRecord:
    """One (class, detector, shots, seed) run."""

    cls: str
    detector: str
    protocol: str                  # "few-shot" | "zero-shot"
    shots: int | None
    seed: int | None
    backbone: str
    device: str
    status: str = "ok"             # "ok" | "skipped" | "failed"
    reason: str | None = None
    metrics: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(METRICS))
    n_test: int = 0
    n_pixel_images: int = 0
    shot_indices: list[int] | None = None
    fit_s: float | None = None
    backbone_ms: float | None = None
    detector_ms: float | None = None
    mem_rise_mb: float | None = None
    mem_peak_mb: float | None = None
    mem_kind: str | None = None
    #: the test set's embeddings came from an earlier run of this class/detector (see _one_run)
    embed_cached: bool = False
    #: image AUROC of good vs each defect type alone (which defects a detector misses)
    per_type_auroc: dict[str, float | None] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return _clean(asdict(self))


def _clean(obj):
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class EvalConfig:
    detectors: Sequence[str | type] = ("graphcore",)
    shots: Sequence[int] = (1, 2, 4)
    seeds: Sequence[int] = (0, 1, 2)
    backbone: str | None = None
    device: str | None = None
    image_size: int | None = None
    batch_size: int = 8
    classes: Sequence[str] | None = None
    max_test: int | None = None
    fpr_limit: float = 0.3
    plots: bool = True
    n_examples: int = 6
    detector_config: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["detectors"] = [resolve_detector(s)[0] if isinstance(s, type) else s for s in self.detectors]
        return _clean(d)


@dataclass
class EvalReport:
    config: EvalConfig
    classes: list[dict]
    runs: list[RunRecord]
    environment: dict
    data: str = ""

    def summary(self) -> list[dict]:
        return summarize(self.runs)

    def to_json(self) -> dict:
        return {"data": self.data, "config": self.config.to_json(), "environment": self.environment,
                "classes": self.classes, "summary": _clean(self.summary()),
                "runs": [r.to_json() for r in self.runs]}


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device)}
    with contextlib.suppress(Exception):
        import anomalib

        env["anomalib"] = anomalib.__version__
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, AttributeError):
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        from inspector.backbones.registry import default_device

        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return dev


def evaluate(data: str | os.PathLike | Sequence[ClassData], config: EvalConfig | None = None,
             out_dir: str | os.PathLike | None = None,
             log: Callable[[str], None] | None = None) -> EvalReport:
    """Run every detector of ``config`` on every class of ``data``; plots go to ``out_dir``."""
    from inspector.backbones.registry import DEFAULT_BACKBONE, load_backbone

    cfg = config or EvalConfig()
    log = log or (lambda s: None)
    classes = list(data) if not isinstance(data, (str, os.PathLike)) else find_classes(data, cfg.classes)
    device = resolve_device(cfg.device)
    requested_bb = cfg.backbone or DEFAULT_BACKBONE
    out = Path(out_dir) if out_dir else None
    runs: list[RunRecord] = []
    load_start = _loadavg()
    specs = [resolve_detector(s) if isinstance(s, type) else (s, None) for s in cfg.detectors]

    for cdata in classes:
        test_cache: dict[str, TestSet] = {}
        bb_ms_cache: dict[str, float] = {}
        train_cache: dict[int, np.ndarray] = {}
        embed_cache: dict[str, dict] = {}
        for spec_name, spec_cls in specs:
            base = RunRecord(cdata.name, spec_name, "zero-shot", None, None, requested_bb, str(device))
            try:
                name, cls = (spec_name, spec_cls) if spec_cls is not None else resolve_detector(spec_name)
            except Exception as exc:  # detector module missing or broken: one row, go on
                runs.append(_replace(base, status="failed", reason=f"cannot load detector: {_first_line(exc)}"))
                log(f"[red]{cdata.name} {spec_name}: cannot load detector: {_first_line(exc)}[/]")
                continue
            few = bool(getattr(cls, "needs_fit", True))
            protocol = "few-shot" if few else "zero-shot"
            grid = [(k, s) for k in cfg.shots for s in cfg.seeds] if few else [(None, None)]
            bb_name = detector_backbone(name, cls, requested_bb)
            try:
                size = cfg.image_size if bb_name == requested_bb else None  # others keep their own size
                backbone = _load_backbone_for(cls, bb_name, device, size, load_backbone)
            except Exception as exc:
                status = "skipped" if isinstance(exc, (FileNotFoundError, SkipRun, ImportError)) else "failed"
                for k, s in grid:
                    runs.append(_replace(base, protocol=protocol, shots=k, seed=s, backbone=bb_name,
                                         status=status, reason=_first_line(exc)))
                log(f"[yellow]{cdata.name} {name}: {status}: {_first_line(exc)}[/]")
                continue
            bb_key = getattr(backbone, "name", bb_name)
            if bb_key not in test_cache:
                test_cache[bb_key] = load_test_set(cdata, backbone.preprocess, cfg.max_test)
                bb_ms_cache[bb_key] = time_backbone(backbone, test_cache[bb_key].x, cfg.batch_size)
            ts = test_cache[bb_key]
            for k, seed in grid:
                rec = _replace(base, protocol=protocol, shots=k, seed=seed, backbone=bb_key,
                               n_test=len(ts), backbone_ms=bb_ms_cache[bb_key])
                keep_plots = cfg.plots and out is not None and (seed is None or seed == cfg.seeds[0])
                try:
                    _one_run(rec, cls, backbone, cdata, ts, k, seed, cfg, device, train_cache,
                             out / cdata.name if keep_plots else None, embed_cache.setdefault(name, {}))
                except (FileNotFoundError, SkipRun, ImportError) as exc:
                    rec.status, rec.reason = "skipped", _first_line(exc)
                except Exception as exc:  # noqa: BLE001 - one detector's crash must not end the run
                    rec.status, rec.reason = "failed", f"{type(exc).__name__}: {_first_line(exc)}"
                runs.append(rec)
                log(_run_line(rec))
    env = environment(device)
    env["load_avg_1m_start"] = load_start
    return EvalReport(cfg, [c.describe() for c in classes], runs, env,
                      data=str(data) if isinstance(data, (str, os.PathLike)) else "")


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _replace(rec: RunRecord, **kw) -> RunRecord:
    d = asdict(rec)
    d.update(kw)
    return RunRecord(**d)


def _load_backbone_for(cls, bb_name: str, device, image_size, load_backbone):
    loader = getattr(cls, "load_backbone", None)  # baselines with their own network
    if callable(loader):
        return loader(bb_name, device=device, image_size=image_size)
    return load_backbone(bb_name, device=device, image_size=image_size)


def _read_train(cdata: ClassData, idx: Sequence[int], cache: dict[int, np.ndarray]) -> list[np.ndarray]:
    from inspector.io import read_image

    for i in idx:
        if i not in cache:
            cache[i] = read_image(cdata.train[i])
    return [cache[i] for i in idx]


def _score(det, x: Tensor, batchwise: bool, batch_size: int):
    from inspector.detectors.base import AnomalyResult

    if batchwise:
        return det.score(x).cpu()
    return AnomalyResult.cat([det.score(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)])


def _one_run(rec: RunRecord, cls, backbone, cdata: ClassData, ts: TestSet, k, seed, cfg: EvalConfig,
             device: torch.device, train_cache, plot_dir: Path | None, embed_cache: dict | None = None) -> None:
    """One fit + score + metrics.

    Detectors whose ``score(x)`` is ``score_embeddings(embed(x), size)`` with an ``embed`` that does
    not depend on the fit (GraphCore, PatchCore-kNN: node features depend on the image only)
    embed the test split once per class; later fits (other k, seeds) reuse it. ``detector_ms``
    still reports the full cost of ``score`` per image: the measured embed time plus this run's
    ``score_embeddings`` time, and the memory rise is at least the embedding run's."""
    det_cfg = dict(cfg.detector_config.get(rec.detector, {}))
    torch.manual_seed(0 if seed is None else seed)
    shots_x = None
    if k is not None:
        if not cdata.train:
            raise SkipRun(f"{cdata.root}/train/good is empty: few-shot protocol needs normal images")
        try:
            rec.shot_indices = draw_shots(len(cdata.train), k, seed)
        except ValueError as exc:
            raise SkipRun(str(exc)) from exc
        shots_x = backbone.preprocess(_read_train(cdata, rec.shot_indices, train_cache))
    with PeakMemory(device) as mem:
        det = construct_detector(cls, backbone, det_cfg)
        t0 = time.perf_counter()
        if shots_x is not None:
            det.fit(shots_x)
        _sync(device)
        rec.fit_s = time.perf_counter() - t0 if shots_x is not None else None
        batchwise = bool(getattr(cls, "batchwise", False))
        reuse = (embed_cache is not None and not batchwise and callable(getattr(det, "embed", None))
                 and callable(getattr(det, "score_embeddings", None)))
        if reuse and "feats" not in embed_cache:
            t0 = time.perf_counter()
            embed_cache["feats"] = torch.cat([det.embed(ts.x[i:i + cfg.batch_size])
                                              for i in range(0, len(ts), cfg.batch_size)])
            _sync(device)
            embed_cache["seconds"] = time.perf_counter() - t0
        elif reuse:
            rec.embed_cached = True
        t0 = time.perf_counter()
        if reuse:
            res = det.score_embeddings(embed_cache["feats"], tuple(ts.x.shape[-2:])).cpu()
        else:
            res = _score(det, ts.x, batchwise, cfg.batch_size)
        _sync(device)
        seconds = time.perf_counter() - t0 + (embed_cache["seconds"] if reuse else 0.0)
        rec.detector_ms = seconds * 1e3 / max(1, len(ts))
    rec.mem_rise_mb, rec.mem_peak_mb, rec.mem_kind = mem.rise_mb, mem.peak_mb, mem.kind
    if reuse:
        embed_cache.setdefault("mem_rise_mb", rec.mem_rise_mb)
        rec.mem_rise_mb = max(rec.mem_rise_mb, embed_cache["mem_rise_mb"])
    if len(res) != len(ts):
        raise RuntimeError(f"detector returned {len(res)} results for {len(ts)} images")
    maps, scores = res.maps, res.scores
    masks = ts.masks(tuple(maps.shape[-2:])) if cdata.has_masks else None
    rec.metrics = compute_metrics(scores, ts.labels, maps if masks is not None else None, masks,
                                  ts.pixel_known, cfg.fpr_limit)
    rec.n_pixel_images = int(ts.pixel_known.sum()) if masks is not None else 0
    types = np.asarray(ts.types)
    for t in sorted(set(ts.types) - {"good"}):
        keep = torch.from_numpy((types == "good") | (types == t))
        rec.per_type_auroc[t] = image_metrics(scores[keep], ts.labels[keep.numpy()])["image_auroc"]
    if plot_dir is not None:
        from inspector.eval import plots

        tag = rec.detector + (f"-k{k}" if k is not None else "")
        title = f"{cdata.name} / {rec.detector}" + (f" k={k} seed={seed}" if k is not None else "")
        rec.plots = [str(p) for p in plots.save_run_plots(
            plot_dir, tag, title, scores.numpy(), ts.labels, maps.numpy(), masks, ts.pixel_known,
            ts.rgb, ts.types, n_examples=cfg.n_examples)]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _run_line(r: RunRecord) -> str:
    what = f"{r.cls} {r.detector}" + (f" k={r.shots} seed={r.seed}" if r.shots is not None else "")
    if r.status != "ok":
        color = "yellow" if r.status == "skipped" else "red"
        return f"[{color}]{what}: {r.status}: {r.reason}[/]"
    m = r.metrics
    return (f"{what}: I-AUROC {_fmt(m['image_auroc'])}  P-AUROC {_fmt(m['pixel_auroc'])}  "
            f"AUPRO {_fmt(m['pixel_aupro'])}  ({r.detector_ms:.1f} ms/img)")


# --------------------------------------------------------------------------------------------
# aggregation and tables


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    a = np.asarray(v, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None, len(a)


TIMING = ("fit_s", "backbone_ms", "detector_ms", "mem_rise_mb")


def summarize(runs: Sequence[RunRecord]) -> list[dict]:
    """Rows per (detector, shots, class) and a ``mean`` row per (detector, shots): metric mean and
    std over seeds; the mean row averages classes within each seed first, then over seeds."""
    by_det: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_det.setdefault(r.detector, []).append(r)
    rows: list[dict] = []
    groups: dict[tuple, list[RunRecord]] = {}
    for det, rs in by_det.items():
        if all(r.status != "ok" for r in rs) and len({(r.status, r.reason) for r in rs}) == 1:
            groups[(det, "all")] = rs  # never ran, for one reason: one row, not k x classes
            continue
        for r in rs:
            groups.setdefault((det, r.shots), []).append(r)
    for (det, shots), group in groups.items():
        if shots == "all":
            rows.append({**_row(det, None, "all", group), "shots": None})
            continue
        class_names = list(dict.fromkeys(r.cls for r in group))
        for cname in class_names:
            rows.append(_row(det, shots, cname, [r for r in group if r.cls == cname]))
        if len(class_names) > 1:
            ok = [r for r in group if r.status == "ok"]
            seeds = list(dict.fromkeys(r.seed for r in ok))
            row = _row(det, shots, "mean", group)
            for key in METRICS:  # per-seed class means, then over seeds
                per_seed = [_mean_std(r.metrics[key] for r in ok if r.seed == s)[0] for s in seeds]
                row[key], row[key + "_std"], _ = _mean_std(per_seed)
            rows.append(row)
    return rows


def _row(det, shots, cname, group: list[RunRecord]) -> dict:
    ok = [r for r in group if r.status == "ok"]
    row: dict[str, Any] = {"detector": det, "shots": shots, "class": cname,
                           "protocol": group[0].protocol, "backbone": group[0].backbone,
                           "device": group[0].device, "n_runs": len(ok)}
    for key in METRICS:
        row[key], row[key + "_std"], _ = _mean_std(r.metrics[key] for r in ok)
    for key in TIMING:
        row[key] = _mean_std(getattr(r, key) for r in ok)[0]
    if not ok:
        row["status"] = group[0].status
        row["reason"] = group[0].reason
    elif len(ok) < len(group):
        bad = [r for r in group if r.status != "ok"]
        row["status"] = "partial"
        row["reason"] = f"{len(bad)} of {len(group)} runs {bad[0].status}: {bad[0].reason}"
    else:
        row["status"] = "ok"
        row["reason"] = None
    return row


def fmt_pm(mean: float | None, std: float | None, pct: bool = True) -> str:
    if mean is None:
        return "-"
    f = 100.0 if pct else 1.0
    return f"{f * mean:.1f}" + (f"±{f * std:.1f}" if std is not None else "")


def _fmt_num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


TABLE_COLUMNS = ("class", "detector", "k", *[METRIC_LABELS[m] for m in METRICS],
                 "fit s", "bb ms/img", "det ms/img", "+MB", "note")


def table_rows(summary: Sequence[dict]) -> list[list[str]]:
    out = []
    for r in summary:
        out.append([
            r["class"], r["detector"],
            "0" if r["protocol"] == "zero-shot" else ("-" if r["shots"] is None else str(r["shots"])),
            *[fmt_pm(r[m], r[m + "_std"]) for m in METRICS],
            _fmt_num(r["fit_s"], 2), _fmt_num(r["backbone_ms"]), _fmt_num(r["detector_ms"]),
            _fmt_num(r["mem_rise_mb"], 0), r.get("reason") or "",
        ])
    return out


def rich_table(summary: Sequence[dict], title: str = "Evaluation"):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for c in TABLE_COLUMNS:
        t.add_column(c, justify="left" if c in ("class", "detector", "note") else "right",
                     overflow="fold", max_width=60 if c == "note" else None)
    prev = None
    for r, cells in zip(summary, table_rows(summary)):
        key = (r["detector"], r["shots"])
        if prev is not None and key != prev:
            t.add_section()
        prev = key
        style = "bold" if r["class"] == "mean" else ("yellow" if r["status"] != "ok" else None)
        t.add_row(*cells, style=style)
    return t


def markdown_table(summary: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for r, cells in zip(summary, table_rows(summary)):
        if r["class"] == "mean":
            cells = [f"**{c}**" if c not in ("", "-") else c for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
