"""The detector protocol, its declared capabilities, and the result every detector returns.

One detector = one package (or file) implementing :class:`Detector`:

* ``fit(images)``: learn from normal images (no-op for zero-shot detectors). ``images`` is a
  preprocessed ``Tensor[B,3,H,W]`` made by ``backbone.preprocess``.
* ``score(images) -> AnomalyResult`` with ``maps: Tensor[B,H,W]`` at the input tensor's
  resolution and ``scores: Tensor[B]`` (higher = more anomalous). Batch-wise detectors (MuSc)
  score the batch against itself; that is part of their contract and documented there.
* ``state() -> (tensors, config)`` and ``from_state(backbone, tensors, config)`` for saving as
  safetensors + JSON (see :mod:`inspector.state`); never pickle.
* ``capabilities``: what else the class offers, declared as data (:class:`Capabilities`), so
  that the product registry, the evaluator, the exporter and the shared CLIP pass read one
  declaration instead of probing methods and signatures.
* :class:`FitEvidence`: a product's real evidence (operator-confirmed normals and defects),
  preprocessed like the shots, for the detectors that declare the ``evidence`` fit option.

The name -> class table is :mod:`inspector.detectors.registry`; the shared map operations
(blur, upsampling, robust max) are :mod:`inspector.detectors.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from inspector.backbones.registry import PatchBackbone
from inspector.errors import InspectorError

MODES = ("fit", "zero", "mutual")


class SkipRun(InspectorError, RuntimeError):
    """A detector cannot run here (missing weights, too few images, an optional library offline):
    the evaluator records the run as skipped instead of failing."""


@dataclass
class AnomalyResult:
    """Pixel anomaly maps ``[B,H,W]`` and image scores ``[B]`` (float32, CPU)."""

    maps: Tensor
    scores: Tensor

    def __post_init__(self):
        if self.maps.ndim != 3 or self.scores.ndim != 1 or self.maps.shape[0] != self.scores.shape[0]:
            raise ValueError(f"bad AnomalyResult shapes: maps {tuple(self.maps.shape)}, scores {tuple(self.scores.shape)}")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def cpu(self) -> AnomalyResult:
        return AnomalyResult(self.maps.detach().float().cpu(), self.scores.detach().float().cpu())

    @staticmethod
    def cat(results: list[AnomalyResult]) -> AnomalyResult:
        return AnomalyResult(torch.cat([r.maps for r in results]), torch.cat([r.scores for r in results]))


@dataclass
class FitEvidence:
    """Real evidence for ``fit(images, evidence=...)``: confirmed parts, preprocessed like the shots.

    ``normals [N,3,H,W]`` and ``defects [M,3,H,W]`` (either count may be 0) at the shots' size;
    ``masks``: one per defect, ``[H,W]`` {0,1} float at the input resolution where an operator
    drew where the defect is, else None (the label is then image-level only).
    """

    normals: Tensor
    defects: Tensor
    masks: list[Tensor | None]

    def __post_init__(self):
        for name in ("normals", "defects"):
            t = getattr(self, name)
            if t.ndim != 4 or t.shape[1] != 3:
                raise ValueError(f"FitEvidence.{name} must be Tensor[N,3,H,W], got {tuple(t.shape)}")
        if self.normals.shape[0] and self.defects.shape[0] and self.normals.shape[-2:] != self.defects.shape[-2:]:
            raise ValueError(f"FitEvidence: normals {tuple(self.normals.shape)} and defects "
                             f"{tuple(self.defects.shape)} differ in size")
        self.masks = list(self.masks)
        if len(self.masks) != self.defects.shape[0]:
            raise ValueError(f"FitEvidence: {len(self.masks)} masks for {self.defects.shape[0]} defects")
        for m in self.masks:
            if m is not None and tuple(m.shape) != tuple(self.defects.shape[-2:]):
                raise ValueError(f"FitEvidence: a mask of {tuple(m.shape)} for defects of {tuple(self.defects.shape[-2:])}")

    @property
    def counts(self) -> dict[str, int]:
        return {"normals": int(self.normals.shape[0]), "defects": int(self.defects.shape[0])}

    def __len__(self) -> int:
        return int(self.normals.shape[0] + self.defects.shape[0])


@dataclass(frozen=True)
class Capabilities:
    """What a detector class offers beyond ``fit`` / ``score`` / ``state``, declared once.

    Each flag names the methods it promises, so a caller checks the flag and calls them:

    * ``mode``: ``"fit"`` learns from normal shots (``fit`` needs images); ``"zero"`` needs none
      (``fit`` is a no-op) and scores images independently; ``"mutual"`` needs none and scores
      a batch against itself (MuSc): it also offers ``extract(x) -> (feats, image_features)`` and
      ``score_features(feats, image_size, image_features=)``, and cannot be a per-image graph.
    * ``exportable``: ``export_module() -> nn.Module`` (images -> maps, scores), the very module
      ``score`` runs (its ``torch_model``); with ``mode == "fit"`` also ``is_fitted``.
    * ``fit_options``: optional keywords ``fit`` accepts (``generator``: the defect generator a
      learned part trains on; ``reuse_head_of``: a fitted detector whose learned head to reuse;
      ``progress``: a ``progress(stage, done, total)`` callback; ``evidence``: a
      :class:`FitEvidence` of the product's confirmed normals and defects).
    * ``needs_clip``: runs only on a ``clip/...`` backbone (``default_backbone`` when another is asked).
    * ``default_backbone``: the backbone it runs on when the caller's does not fit (or its own).
    * ``own_backbone``: brings its own network: ``load_backbone(name, device=, image_size=)``.
    * ``default_image_size``: ``default_image_size(backbone, config) -> int | None`` picks the input
      side for a configuration (official presets); otherwise the backbone's default size.
    * ``shared_pass``: can score from one shared CLIP forward (:mod:`inspector.detectors.shared_pass`):
      ``pass_spec()``, and ``score_pass(out, size)`` (per image) or ``from_pass(out)`` (mutual).
    * ``embeds``: ``score(x) == score_embeddings(embed(x), size)`` with an ``embed`` that does not
      depend on the fit, so an evaluation of several fits embeds its test set once.
    * ``pretrained``: its learned part is trained elsewhere and loaded with
      ``from_pretrained(checkpoint, backbone=)`` (a missing checkpoint is a clear error).
    * ``trainable``: the parts that are learned (by ``fit`` or, with ``pretrained``, offline).
    * ``product``: can back a registered product (``state`` / ``from_state``); the evaluator's
      third-party baselines cannot.
    """

    mode: str
    exportable: bool = False
    fit_options: frozenset[str] = frozenset()
    needs_clip: bool = False
    default_backbone: str | None = None
    own_backbone: bool = False
    default_image_size: bool = False
    shared_pass: bool = False
    embeds: bool = False
    pretrained: bool = False
    trainable: frozenset[str] = frozenset()
    product: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.needs_clip or self.own_backbone) and not self.default_backbone:
            raise ValueError("needs_clip and own_backbone need a default_backbone")
        if self.mode != "fit" and self.fit_options:
            raise ValueError(f"a {self.mode!r} detector has no fit options")

    @property
    def batchwise(self) -> bool:
        """``score`` needs the whole batch (mutual scoring)."""
        return self.mode == "mutual"

    @property
    def needs_fit(self) -> bool:
        """``fit`` needs normal images."""
        return self.mode == "fit"


def capabilities_of(detector: Any) -> Capabilities:
    """The declared :class:`Capabilities` of a detector class or instance.

    A class written to the minimal protocol only (``name``, ``needs_fit``, ``batchwise``: a test
    stand-in, a user's class handed to ``inspector eval``) gets the mode those two attributes
    state and no optional capability. This is the one place that reads a class without a
    declaration.
    """
    cls = detector if isinstance(detector, type) else type(detector)
    declared = getattr(cls, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    if getattr(cls, "batchwise", False):
        return Capabilities("mutual")
    return Capabilities("fit" if getattr(cls, "needs_fit", True) else "zero")


@runtime_checkable
class Detector(Protocol):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    backbone: PatchBackbone

    def fit(self, images: Tensor) -> Detector: ...

    def score(self, images: Tensor) -> AnomalyResult: ...

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...


__all__ = ["MODES", "AnomalyResult", "Capabilities", "Detector", "FitEvidence", "SkipRun", "capabilities_of"]
