"""The model serving a product: a loaded backbone + detector (:class:`TorchRuntime`) or the
product's exported ONNX graph (:class:`OnnxAdapter`), behind one face.

Both give ``preprocess(images)``, ``resize`` (RGB -> model input size, no normalisation),
``size``, ``mode`` and ``score_tensor(x) -> AnomalyResult``; the registry caches one per product
model and runtime kind, and the inspect step on top of either is the one
:func:`inspector.inspection.inspections_from`.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from inspector.detectors.base import AnomalyResult
from inspector.products.product import RuntimeUnavailable


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
        if self.mode == "mutual":  # a mutual detector offers extract + score_features
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
        if self.mode != "mutual":
            raise RuntimeUnavailable(f"{self.detector.name} cannot score a feature set (not a mutual detector)")
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
    :class:`TorchRuntime` face used by inspection and batches (images scored independently).
    Products whose detector scores images against each other (MuSc) have no graph; the registry
    refuses them before calling :meth:`load`."""

    mode = "fit"

    def __init__(self, runner):
        self.runner = runner
        self.preprocess = runner.preprocess
        self.resize = runner.preprocess.resize
        self.size = runner.size

    @classmethod
    def load(cls, prod, registry) -> OnnxAdapter:
        """The runner on ``prod``'s graph (exported into its folder on first use) on ``registry``'s device."""
        try:
            from inspector.deploy.runtime import load_runtime
        except ImportError as exc:
            raise RuntimeUnavailable(f"the onnx runtime is not installed here ({exc}); use --runtime torch") from exc
        from inspector.deploy.export import NotExportableError

        device = None if registry.device is None else str(registry.device)
        try:
            return cls(load_runtime(prod, "onnx", registry=registry, device=device))
        except NotExportableError as exc:
            raise RuntimeUnavailable(f"product {prod.name!r} cannot run on onnx: {exc}") from exc

    def score_tensor(self, x: torch.Tensor) -> AnomalyResult:
        return self.runner.score(x).cpu()


__all__ = ["OnnxAdapter", "TorchRuntime"]
