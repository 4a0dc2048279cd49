"""ONNX export of the patch backbone and, where expressible, a detector's scoring.

One graph per product: preprocessed images ``float32[B,3,S,S]`` (dynamic batch ``B``, fixed
side ``S``) -> ``maps float32[B,S,S]`` and ``scores float32[B]``, exactly what the detector's
torch ``score`` returns. A bare backbone graph returns one ``float32[B,h,w,C]`` output per
feature layer instead.

Beside ``model.onnx`` a JSON sidecar ``model.json`` holds what the runner needs to reproduce the
torch path without the torch code: the preprocessing (side, mean, std, resize rule), thresholds,
detector/backbone names, versions (inspector, torch, onnx, opset), the product version and the
file's sha256. The runner (:mod:`inspector.deploy.runtime`) rebuilds the very same
:class:`~inspector.backbones.registry.Preprocess` from it, so torch and ONNX see identical input tensors.

What is exported:

* ``graphcore`` / ``patchcore`` / ``patchcore-aug``: the detector's own
  :class:`~inspector.detectors.graphcore.torch_model.GraphCoreScorer` (what its ``score`` runs): backbone,
  memory-bank distance (bank as a constant, min over the bank in chunks), the trained graph head
  (torch_geometric EdgeConv/SAGEConv with mean aggregation -> ScatterElements), the global branch,
  patch->pixel upsampling, Gaussian blur (as convolutions) and image score.
* ``anomalyclip``: :class:`~inspector.detectors.anomalyclip.torch_model.AnomalyCLIPGraph`, backbone +
  the same scoring as its ``score`` (:func:`~inspector.detectors.anomalyclip.torch_model.score_visual`),
  with the two text embeddings folded in as constants (the text encoder is not part of the graph).
* ``musc``: not exportable. MuSc scores each image against the other images of its batch, so a
  per-image graph cannot express it; :class:`NotExportableError` says so (the backbone alone can
  still be exported with ``inspector export --backbone``).

Detectors own their scoring: a detector that declares ``capabilities.exportable`` provides
``export_module() -> nn.Module`` (images -> ``(maps, scores)``), the module of its ``torch_model``
that its ``score`` runs, so there is one statement of each scoring formula. A detector from
elsewhere can be made exportable without changing it by :func:`register_adapter` (a builder from
the fitted detector to such a module, wrapping its own state and functions).

The exporter uses the legacy TorchScript-based ``torch.onnx.export(..., dynamo=False)`` with an
explicit opset: it handles the shape arithmetic of TF-"SAME" padding and the unrolled chunk
loops without the optional ``onnxscript`` dependency, and it keeps the batch axis symbolic.
Every export is checked before the files are written (:func:`check_parity`): onnxruntime on the
CPU against the detector's own ``score()`` on probe images, at batch 2 and at batch 1; the
numbers go into the sidecar.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from inspector.backbones.registry import PatchBackbone, Preprocess, load_backbone
from inspector.detectors.base import capabilities_of
from inspector.detectors.registry import DETECTORS, capabilities, detector_class
from inspector.state import file_sha256

#: ONNX opset used for every export (onnxruntime >= 1.16 runs it; Gelu/LayerNorm fuse at 17).
OPSET = 17
#: Sidecar format identifier and version; the runner refuses other formats.
FORMAT = "inspector-onnx"
FORMAT_VERSION = 1
#: Parity rule (fp32, CPU), numpy-allclose style: ``|onnx - torch| <= ATOL + RTOL * |torch|``
#: elementwise. ``ATOL`` alone is the whole budget for outputs of order 1 (AnomalyCLIP maps and
#: scores in [0, 1]; GraphCore/PatchCore on L2-normalised layers); ``RTOL`` matters only for
#: distance maps of order 10-100 (GraphCore with ``normalize=False`` on Lite0), where fp32 torch
#: itself is ~1e-4 away from a float64 evaluation of the same graph.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-5
#: The export refuses to write a graph whose worst element exceeds the rule by this factor
#: (a gross mismatch, not float rounding on another CPU); the measured ratio goes in the sidecar.
EXPORT_SLACK = 10.0

#: How :class:`~inspector.backbones.registry.Preprocess` resizes, in words, for non-Python consumers.
RESIZE_RULE = {
    "library": "opencv cv2.resize",
    "target": "square size x size (aspect ratio not kept)",
    "shrink": "INTER_AREA when the image is larger than size on either side",
    "enlarge": "INTER_LINEAR otherwise",
    "unchanged": "no resize when the image already is size x size",
}


class NotExportableError(ValueError):
    """This detector (or configuration) cannot be expressed as a per-image ONNX graph."""


class ExportParityError(RuntimeError):
    """The exported graph disagrees with torch beyond tolerance on the probe images."""


@dataclass
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any] = field(default_factory=dict)

    @property
    def parity(self) -> dict[str, Any]:
        return self.sidecar.get("parity", {})


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``models/P.onnx`` -> ``models/P.json``."""
    return Path(onnx_path).with_suffix(".json")


# -- graph modules ------------------------------------------------------------------------------
def _cpu_fp32_copy(module: nn.Module) -> nn.Module:
    """A CPU fp32 copy for tracing: no bf16 autocast and no device moves baked into the graph."""
    m = copy.deepcopy(module).to("cpu").float().eval()
    for sub in m.modules():
        if isinstance(sub, PatchBackbone):
            sub.fp32 = True
    return m


class BackboneGraph(nn.Module):
    """Preprocessed images -> one ``[B,h,w,C]`` tensor per layer (in ``backbone.layers`` order)."""

    def __init__(self, backbone: PatchBackbone):
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(backbone.layers)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        feats = self.backbone._features(images)
        return tuple(feats[k].float() for k in self.layers)


# Detector name -> builder(detector) -> nn.Module(images) -> (maps, scores), for detectors that do
# not declare ``capabilities.exportable`` (none of this package's: they export their torch_model).
_ADAPTERS: dict[str, Callable[[Any], nn.Module]] = {}


def register_adapter(*names: str):
    def deco(fn):
        for n in names:
            _ADAPTERS[n] = fn
        return fn

    return deco


def _detector_name(detector) -> str:
    return str(detector.name).lower()


def scoring_module(detector) -> nn.Module:
    """The detector's scoring as one traceable module: images ``[B,3,S,S]`` -> ``(maps, scores)``.

    Raises :class:`NotExportableError` for batch-wise detectors (MuSc), unfitted ones and ones
    neither exportable nor adapted.
    """
    name = _detector_name(detector)
    caps = capabilities_of(detector)
    if caps.batchwise:
        raise NotExportableError(_batchwise_message(name, detector.backbone.name))
    if caps.exportable:
        if caps.needs_fit and not detector.is_fitted:
            raise NotExportableError(f"detector {name!r} is not fitted; fit it (register the product) before export")
        return detector.export_module()
    if name in _ADAPTERS:
        return _ADAPTERS[name](detector)
    exportable = sorted(n for n in DETECTORS if capabilities(n).exportable) + sorted(_ADAPTERS)
    raise NotExportableError(
        f"detector {name!r} has no ONNX export (not declared exportable and no adapter); "
        f"exportable: {', '.join(exportable) or 'none'}"
    )


def _batchwise_message(name: str, backbone: str) -> str:
    return (f"detector {name!r} is not exportable to ONNX: it scores each image against the other images "
            "of its batch (mutual scoring), which a per-image graph cannot express. Use the torch runtime "
            "for this product, or export only its feature extractor: "
            f"inspector export --backbone {backbone} --out models/<name>.onnx")


class DetectorGraph(nn.Module):
    """Wraps a scoring module: the graph's two outputs, ``maps`` and ``scores``, as float32."""

    def __init__(self, scorer: nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps, scores = self.scorer(images)
        return maps.float(), scores.float()


# -- export -------------------------------------------------------------------------------------


def _versions(opset: int) -> dict[str, str | int]:
    import onnx

    try:
        from inspector import __version__
    except ImportError:  # editable install imported from outside the repository
        from importlib.metadata import version

        __version__ = version("inspector")
    out: dict[str, str | int] = {"inspector": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                                 "opset": opset}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass
    return out


def probe_images(size: int, n: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Deterministic RGB uint8 probe images for the export-time parity check: noise + structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = []
    for i in range(n):
        base = 127 + 100 * np.sin(2 * np.pi * (xx * (2 + i) + yy * (1 + i)))
        img = base[..., None] + rng.normal(0, 25, (size, size, 3))
        if i % 2:  # a bright square "defect"
            s = size // 4
            img[s:2 * s, s:2 * s] = 250
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _trace_export(module: nn.Module, example: Tensor, out: Path, input_name: str,
                  output_names: Sequence[str], opset: int) -> None:
    dynamic = {input_name: {0: "batch"}, **{k: {0: "batch"} for k in output_names}}
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python ints from shapes are expected: the spatial size is fixed by
        # design (TF-SAME padding is computed from it); only the batch axis is dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(out), dynamo=False, opset_version=opset, input_names=[input_name],
            output_names=list(output_names), dynamic_axes=dynamic, do_constant_folding=True,
        )


def parity_error(got, ref) -> float:
    """Max abs difference (``nan`` counts as infinite)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.size == 0:
        return 0.0
    d = np.abs(got - ref)
    return float("inf") if np.isnan(d).any() else float(d.max())


def parity_ratio(got, ref, atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL) -> float:
    """Worst ``|got - ref| / (atol + rtol * |ref|)``: <= 1 means within the parity rule."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.size == 0:
        return 0.0
    r = np.abs(got - ref) / (atol + rtol * np.abs(ref))
    return float("inf") if np.isnan(r).any() else float(r.max())


def check_parity(reference: Callable[[Tensor], Any], onnx_path: Path, x: Tensor,
                 output_names: Sequence[str]) -> dict[str, float]:
    """Max abs difference per output between torch ``reference(x)`` and onnxruntime (CPU), over the
    whole batch and over its first image run alone (the batch axis must really be dynamic)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = reference(x)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    feed = sess.get_inputs()[0].name
    got = sess.run(list(output_names), {feed: x.numpy()})
    got1 = sess.run(list(output_names), {feed: x[:1].numpy()})
    out: dict[str, float] = {}
    for name, r, g, g1 in zip(output_names, ref, got, got1):
        r = r.detach().float().cpu().numpy()
        if r.shape != g.shape or r[:1].shape != g1.shape:
            raise ExportParityError(f"output {name!r}: onnx shapes {g.shape}/{g1.shape} != torch shape {r.shape}")
        out[name] = max(parity_error(g, r), parity_error(g1, r[:1]))
        out[f"{name}_scale"] = float(np.abs(r).max()) if r.size else 0.0
        out[f"{name}_ratio"] = max(parity_ratio(g, r), parity_ratio(g1, r[:1]))
    return out


def _write_atomically(tmp_onnx: Path, out: Path, sidecar: dict[str, Any]) -> Path:
    from inspector.state import atomic_write_json

    os.replace(tmp_onnx, out)
    side = sidecar_path(out)
    atomic_write_json(side, sidecar)
    return side


def _export(module: nn.Module, *, size: int, out: str | os.PathLike, output_names: Sequence[str],
            sidecar: dict[str, Any], preprocess: Preprocess, opset: int, verify: bool,
            slack: float, reference: Callable[[Tensor], Any] | None = None,
            reference_name: str = "the traced torch module") -> ExportResult:
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2 for tracing, so nothing can specialise on B == 1.
    example = preprocess(probe_images(size, 2))
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        _trace_export(module, example, tmp_path, "images", output_names, opset)
        if verify:
            parity = check_parity(reference or module, tmp_path, example, output_names)
            for name in output_names:
                if parity[f"{name}_ratio"] > slack:
                    raise ExportParityError(
                        f"exported graph disagrees with {reference_name} on output {name!r}: max |diff| {parity[name]:.3g} "
                        f"is {parity[name + '_ratio']:.3g}x the rule |diff| <= {PARITY_ATOL:g} + {PARITY_RTOL:g}*|torch| "
                        f"(allowed {slack:g}x); not writing {out}"
                    )
            sidecar["parity"] = {"checked_on": "probe images (batch 2 and 1), CPUExecutionProvider, fp32",
                                 "reference": reference_name,
                                 "rule": f"|onnx - torch| <= {PARITY_ATOL:g} + {PARITY_RTOL:g} * |torch|", **parity}
        sidecar["onnx_sha256"] = file_sha256(tmp_path)
        sidecar["onnx_bytes"] = tmp_path.stat().st_size
        side = _write_atomically(tmp_path, out, sidecar)
    finally:
        tmp_path.unlink(missing_ok=True)
    return ExportResult(out, side, sidecar)


def _base_sidecar(kind: str, backbone: PatchBackbone, opset: int) -> dict[str, Any]:
    pre = backbone.preprocess
    size = pre.size
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "backbone": backbone.name,
        "preprocess": {**pre.to_dict(), "input": "RGB uint8 HxWx3", "scale": "x / 255, then (x - mean) / std",
                       "layout": "NCHW float32", "resize": RESIZE_RULE},
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"},
        "versions": _versions(opset),
    }


def export_backbone(backbone: PatchBackbone | str, out: str | os.PathLike, *, image_size: int | None = None,
                    opset: int = OPSET, verify: bool = True, slack: float = EXPORT_SLACK) -> ExportResult:
    """Export the bare feature extractor: ``images[B,3,S,S]`` -> one ``[B,h,w,C]`` output per layer."""
    if isinstance(backbone, str):
        backbone = load_backbone(backbone, device="cpu", image_size=image_size)
    elif image_size and image_size != backbone.preprocess.size:
        raise ValueError(f"backbone was built for {backbone.preprocess.size} px; rebuild it for {image_size}")
    bb = _cpu_fp32_copy(backbone)
    size = bb.preprocess.size
    graph = BackboneGraph(bb).eval()
    h, w = bb.patch_grid(size, size)
    sidecar = _base_sidecar("backbone", bb, opset)
    sidecar["outputs"] = {k: {"shape": ["batch", h, w, bb.dims[k]], "dtype": "float32"} for k in bb.layers}
    sidecar["layers"] = list(bb.layers)
    return _export(graph, size=size, out=out, output_names=list(bb.layers), sidecar=sidecar,
                   preprocess=bb.preprocess, opset=opset, verify=verify, slack=slack)


def export_detector(detector, out: str | os.PathLike, *, thresholds=None, product: str | None = None,
                    product_version: str | None = None, opset: int = OPSET, verify: bool = True,
                    slack: float = EXPORT_SLACK, extra: dict[str, Any] | None = None) -> ExportResult:
    """Export backbone + the detector's scoring: ``images[B,3,S,S]`` -> ``maps[B,S,S]``, ``scores[B]``."""
    name = _detector_name(detector)
    # The scoring module holds its own tensors (buffers) and the backbone; a CPU fp32 copy of it is
    # traced, so the live detector (maybe on CUDA, bf16 autocast) is left untouched.
    graph = DetectorGraph(_cpu_fp32_copy(scoring_module(detector))).eval()
    bb = next(m for m in graph.modules() if isinstance(m, PatchBackbone))
    size = bb.preprocess.size
    sidecar = _base_sidecar("detector", bb, opset)
    sidecar.update({
        "detector": name,
        "outputs": {"maps": {"shape": ["batch", size, size], "dtype": "float32"},
                    "scores": {"shape": ["batch"], "dtype": "float32"}},
        "product": product,
        "product_version": product_version,
        "thresholds": _thresholds_dict(thresholds),
    })
    if extra:
        sidecar.update(extra)
    # The parity reference is the detector's own score(), not the traced module: an adapter that
    # drifted from the detector's code fails here instead of shipping different scores.
    live = getattr(detector.backbone, "device", torch.device("cpu"))
    on_cpu = torch.device(live).type == "cpu"
    reference = _DetectorReference(detector)
    return _export(graph, size=size, out=out, output_names=["maps", "scores"], sidecar=sidecar,
                   preprocess=bb.preprocess, opset=opset, verify=verify,
                   # Off the CPU the reference runs in fp32 but cuDNN may use TF32 convolutions:
                   # the check then only guards against gross mismatches.
                   slack=slack if on_cpu else max(slack, 1000.0), reference=reference,
                   reference_name=f"{name}.score() on {torch.device(live).type}")


class _DetectorReference:
    """``images -> (maps, scores)`` from the live detector's ``score``, in fp32 (no bf16 autocast)."""

    def __init__(self, detector):
        self.detector = detector

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        bb = self.detector.backbone
        if torch.device(getattr(bb, "device", "cpu")).type == "cpu":  # no autocast on the CPU
            res = self.detector.score(images)
            return res.maps, res.scores
        # On CUDA the backbone autocasts to bf16 unless ``fp32`` is set: set it for this call only
        # (a shared backbone serving other threads meanwhile just runs in fp32 for that moment).
        had = getattr(bb, "fp32", None)
        bb.fp32 = True
        try:
            res = self.detector.score(images)
        finally:
            if had is None:
                del bb.fp32
            else:
                bb.fp32 = had
        return res.maps, res.scores


def _thresholds_dict(thresholds) -> dict[str, float] | None:
    if thresholds is None:
        return None
    if isinstance(thresholds, dict):
        return {"ok_below": float(thresholds["ok_below"]), "ng_above": float(thresholds["ng_above"])}
    return {"ok_below": float(thresholds.ok_below), "ng_above": float(thresholds.ng_above)}


def export_product(product, out: str | os.PathLike, **kwargs) -> ExportResult:
    """Export a registered :class:`~inspector.products.registry.Product` (its fitted detector + thresholds)."""
    if capabilities(product.detector).batchwise:
        # The clear "not exportable" error before loading anything (the class is enough).
        raise NotExportableError(_batchwise_message(product.detector, product.backbone))
    detector = _load_product_detector(product)
    extra = {"model_hash": getattr(product, "model_hash", None), "image_size": getattr(product, "image_size", None)}
    return export_detector(detector, out, thresholds=product.thresholds, product=product.name,
                           product_version=product.version, extra={**extra, **kwargs.pop("extra", {})}, **kwargs)


def _load_product_detector(product, device: str = "cpu"):
    """The product's fitted detector, loaded afresh on the CPU from its saved state.

    Not ``product.load_detector()``: that goes through the registry's runtime cache under its lock,
    and the onnx runtime is itself built under that lock (first ``--runtime onnx`` use exports).
    On the CPU the export-time parity check compares fp32 with fp32, at the strict tolerance.
    """
    from inspector.backbones.registry import load_backbone as _load_backbone
    from inspector.state import load_state

    stem = Path(product.path) / f"state-{product.model_hash}" if getattr(product, "path", None) else None
    if stem is None or not stem.with_suffix(".safetensors").is_file():
        return product.load_detector()
    bb = _load_backbone(product.backbone, device=device, image_size=product.image_size or None)
    tensors, config = load_state(stem, device=device)
    return detector_class(product.detector).from_state(bb, tensors, config)


def read_sidecar(onnx_path: str | os.PathLike) -> dict[str, Any]:
    side = sidecar_path(onnx_path)
    if not side.is_file():
        raise FileNotFoundError(f"{onnx_path}: sidecar {side.name} not found beside it (written by `inspector export`)")
    data = json.loads(side.read_text())
    if data.get("format") != FORMAT or int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{side}: not an {FORMAT} v{FORMAT_VERSION} sidecar")
    return data


__all__ = [
    "BackboneGraph",
    "DetectorGraph",
    "ExportParityError",
    "ExportResult",
    "NotExportableError",
    "OPSET",
    "PARITY_ATOL",
    "PARITY_RTOL",
    "parity_error",
    "parity_ratio",
    "check_parity",
    "export_backbone",
    "export_detector",
    "export_product",
    "probe_images",
    "read_sidecar",
    "register_adapter",
    "scoring_module",
    "sidecar_path",
]
