"""Evaluation on MVTec-layout folders: the few-/zero-shot protocols, timing, the report.

Data (:mod:`inspector.eval.data`)
    Any MVTec-layout folder, several classes or one; ``test/good`` label 0, other types label 1;
    pixel metrics over the images whose masks are known.

Metrics (:mod:`inspector.eval.metrics`: anomalib 2.7 metric classes)
    image AUROC, AP, F1-max; pixel AUROC, AUPRO up to ``fpr_limit`` FPR, F1-max. Maps are compared
    with masks at the detector's input resolution (masks resized with nearest neighbour).
    Tables: :mod:`inspector.eval.tables`.

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
    memory during fit + score (:class:`inspector.eval.measure.PeakMemory`): CPU resident set size
    sampled every 2 ms, or CUDA
    ``max_memory_allocated``; reported as the rise above the level before the run, the absolute
    peak is in the JSON.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from inspector.detectors.base import SkipRun, capabilities_of
from inspector.detectors.registry import detector_class
from inspector.eval.data import ClassData, TestSet, draw_shots, find_classes, load_test_set
from inspector.eval.measure import PeakMemory, sync
from inspector.eval.metrics import METRICS, auroc, compute_metrics
from inspector.eval.tables import summarize

FEW_SHOT_DEFAULT = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------
# timing and memory


@torch.inference_mode()
def time_backbone(backbone, x: Tensor, batch_size: int = 8) -> float:
    """ms/image of ``backbone.embed`` over ``x`` in batches, after a one-image warm-up."""
    dev = backbone.device
    backbone.embed(x[:1])
    sync(dev)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        backbone.embed(x[i:i + batch_size])
    sync(dev)
    return (time.perf_counter() - t0) * 1e3 / max(1, len(x))


# --------------------------------------------------------------------------------------------
# detectors


def resolve_detector(spec: str | type) -> tuple[str, type]:
    """``(name, class)`` for a registry name (baselines included) or a detector class."""
    if isinstance(spec, type):
        return spec.name, spec
    return spec, detector_class(spec)


def detector_backbone(name: str, cls: type, requested: str) -> str:
    """The backbone a detector runs on: the requested one, except for detectors tied to a family
    (AnomalyCLIP needs a CLIP backbone: its declared ``default_backbone``) or bringing their own."""
    caps = capabilities_of(cls)
    if caps.needs_clip and not requested.startswith("clip/"):
        return caps.default_backbone
    if caps.own_backbone:  # baselines that bring their own network
        return caps.default_backbone
    return requested


def construct_detector(cls, backbone, config: dict[str, Any]):
    """``cls(backbone, **config)``; detectors whose weights are learned elsewhere (AnomalyCLIP's
    prompts) load them with ``cls.from_pretrained(config["checkpoint"] or default, backbone)``, so a
    missing checkpoint is a clear ``MissingWeightsError`` (reported as skipped), never a run with
    untrained prompts."""
    config = dict(config)
    if capabilities_of(cls).pretrained:
        det = cls.from_pretrained(config.pop("checkpoint", None), backbone=backbone)
        for k, v in config.items():  # simple runtime options (e.g. chunk) only
            if not hasattr(det, k):
                raise ValueError(f"{cls.name}: unknown option {k!r} with a checkpoint")
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
            few = capabilities_of(cls).needs_fit
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
    if capabilities_of(cls).own_backbone:  # baselines with their own network
        return cls.load_backbone(bb_name, device=device, image_size=image_size)
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
        sync(device)
        rec.fit_s = time.perf_counter() - t0 if shots_x is not None else None
        batchwise = capabilities_of(cls).batchwise
        reuse = (embed_cache is not None and not batchwise and callable(getattr(det, "embed", None))
                 and callable(getattr(det, "score_embeddings", None)))
        if reuse and "feats" not in embed_cache:
            t0 = time.perf_counter()
            embed_cache["feats"] = torch.cat([det.embed(ts.x[i:i + cfg.batch_size])
                                              for i in range(0, len(ts), cfg.batch_size)])
            sync(device)
            embed_cache["seconds"] = time.perf_counter() - t0
        elif reuse:
            rec.embed_cached = True
        t0 = time.perf_counter()
        if reuse:
            res = det.score_embeddings(embed_cache["feats"], tuple(ts.x.shape[-2:])).cpu()
        else:
            res = _score(det, ts.x, batchwise, cfg.batch_size)
        sync(device)
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
        rec.per_type_auroc[t] = auroc(scores[keep], ts.labels[keep.numpy()])
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
