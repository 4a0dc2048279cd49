"""onnxruntime runner for graphs written by :mod:`inspector.deploy.export`.

``OnnxRunner(path)`` reads ``path`` (``.onnx``) and its JSON sidecar, checks the file's sha256,
and opens an onnxruntime session on CUDA (``CUDAExecutionProvider``) when onnxruntime-gpu and a
GPU are present, on the CPU otherwise. Images go through the same
:class:`~inspector.backbones.base.Preprocess` class as the torch path, rebuilt from the sidecar, so
resizing and normalisation cannot drift between the two.

A detector graph gives ``score(images) -> AnomalyResult`` and ``inspect(images) ->
list[Inspection]`` (verdicts from the sidecar's thresholds, maps at each image's original size),
like :class:`~inspector.products.product.Product`; a backbone graph gives ``features(images)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspector.backbones.base import Preprocess
from inspector.deploy.export import read_sidecar
from inspector.inspection import as_rgb8_list, inspections_from
from inspector.state import file_sha256

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN from the pip ``nvidia-*`` wheels (the ones torch uses)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if callable(preload):
        try:
            preload()
        except Exception:  # noqa: BLE001 - system CUDA may still be found on the library path
            pass


def select_providers(device: str | None = None, tf32: bool = False) -> list:
    """Execution providers for ``device``: ``None``/``"auto"`` = CUDA if usable else CPU."""
    device = str(device or "auto").lower()
    device_id = "0"
    if device.startswith("cuda:"):
        device, device_id = "cuda", device.split(":", 1)[1]
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    avail = available_providers()
    if device in ("auto", "cuda") and CUDA_EP in avail:
        _preload_cuda_libraries()
        opts: dict[str, Any] = {"device_id": device_id, "use_tf32": "1" if tf32 else "0"}
        return [(CUDA_EP, opts), CPU_EP]
    if device == "cuda":
        raise RuntimeError(
            "CUDAExecutionProvider is not available in this onnxruntime build "
            f"(providers: {', '.join(avail)}). Install onnxruntime-gpu: `pip uninstall -y onnxruntime && "
            "pip install onnxruntime-gpu` (both install the same `onnxruntime` module, so the CPU package must go first)."
        )
    return [CPU_EP]


class OnnxRunner:
    """An exported inspector graph on onnxruntime.

    Args:
        path: the ``.onnx`` file; ``<stem>.json`` must lie beside it.
        device: ``"auto"`` (CUDA when available), ``"cuda"`` (error if not) or ``"cpu"``.
        batch_size: images per session run in :meth:`score`/:meth:`inspect`.
        threads: CPU intra-op threads (default: onnxruntime's choice).
        tf32: allow TF32 matmuls/convs on Ampere+ GPUs (faster, breaks 1e-4 fp32 parity).
        verify_hash: check the file against the sidecar's sha256 before loading.
    """

    def __init__(self, path: str | os.PathLike, device: str | None = None, *, batch_size: int = 8,
                 threads: int | None = None, tf32: bool = False, verify_hash: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        self.meta = read_sidecar(self.path)
        if verify_hash and self.meta.get("onnx_sha256") and file_sha256(self.path) != self.meta["onnx_sha256"]:
            raise ValueError(f"{self.path}: sha256 differs from its sidecar; the model file was changed or truncated")
        pre = self.meta["preprocess"]
        self.preprocess = Preprocess(int(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]))
        self.kind: str = self.meta["kind"]
        self.backbone_name: str = self.meta.get("backbone", "")
        self.detector_name: str | None = self.meta.get("detector")
        self.product: str | None = self.meta.get("product")
        self.version: str | None = self.meta.get("product_version")
        self.batch_size = max(1, int(batch_size))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        providers = select_providers(device, tf32)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception:  # noqa: BLE001
            if not isinstance(providers[0], tuple):
                raise
            # An onnxruntime-gpu build that does not know an option (use_tf32 is 1.18+): plain CUDA.
            providers = [(CUDA_EP, {"device_id": providers[0][1]["device_id"]}), CPU_EP]
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.thresholds = None
        if self.meta.get("thresholds"):
            from inspector.verdict import Thresholds

            self.thresholds = Thresholds(**self.meta["thresholds"])

    # -- basics ---------------------------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == CUDA_EP else "cpu"

    @property
    def size(self) -> int:
        return self.preprocess.size

    def __repr__(self) -> str:
        what = self.detector_name or "features"
        return f"OnnxRunner({self.path.name}: {self.backbone_name}+{what} @ {self.size}px on {self.device})"

    def _as_input(self, images) -> np.ndarray:
        """Preprocessed ``[B,3,S,S]`` (ndarray/Tensor) as-is; RGB uint8 image(s) through Preprocess."""
        if isinstance(images, torch.Tensor):
            x = images.detach().to("cpu", torch.float32).numpy()
        elif isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3 \
                and images.dtype == np.float32:
            x = images
        else:
            x = self.preprocess(images).numpy()
        if x.ndim != 4 or x.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"{self.path.name} expects [B,3,{self.size},{self.size}] input, got {tuple(x.shape)}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, images) -> dict[str, np.ndarray]:
        """One session run over the whole batch: ``{output name: array}``."""
        x = self._as_input(images)
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs))

    def _batches(self, images):
        if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) == 4:
            for i in range(0, len(images), self.batch_size):
                yield images[i:i + self.batch_size]
        else:
            if isinstance(images, np.ndarray):  # one HxWx3 image
                images = [images]
            images = list(images)
            for i in range(0, len(images), self.batch_size):
                yield images[i:i + self.batch_size]

    # -- backbone graphs ------------------------------------------------------------------------
    def features(self, images) -> dict[str, np.ndarray]:
        """Backbone graph: ``{layer: [B,h,w,C]}`` like ``PatchBackbone.embed``."""
        if self.kind != "backbone":
            raise ValueError(f"{self.path.name} is a {self.kind} graph; features() needs a backbone export")
        parts = [self.run(b) for b in self._batches(images)]
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}

    # -- detector graphs ------------------------------------------------------------------------
    def score(self, images):
        """Detector graph: ``AnomalyResult`` (maps ``[B,S,S]`` at model resolution, scores ``[B]``)."""
        from inspector.detectors.base import AnomalyResult

        if self.kind != "detector":
            raise ValueError(f"{self.path.name} is a bare backbone graph; it has no anomaly scoring")
        maps, scores = [], []
        for b in self._batches(images):
            out = self.run(b)
            maps.append(out["maps"])
            scores.append(out["scores"])
        return AnomalyResult(torch.from_numpy(np.concatenate(maps)), torch.from_numpy(np.concatenate(scores)))

    def inspect(self, images: Sequence[np.ndarray]) -> list:
        """Like ``Product.inspect``: one :class:`~inspector.inspection.Inspection` per RGB uint8 image."""
        images = as_rgb8_list(images)  # same validation as ProductRegistry.inspect
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            t0 = time.perf_counter()
            res = self.score(chunk)
            ms = (time.perf_counter() - t0) * 1e3 / len(chunk)
            out += inspections_from(chunk, res.maps.numpy(), res.scores.numpy(), self.thresholds, ms)
        return out
