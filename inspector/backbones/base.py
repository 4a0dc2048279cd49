"""The one patch-feature backbone contract shared by every detector and by export.

A :class:`PatchBackbone` turns a preprocessed batch ``Tensor[B,3,H,W]`` into multi-layer patch
features ``{layer: Tensor[B,h,w,C]}`` in one forward pass. All layers of one backbone share one
patch grid ``(h, w) = patch_grid(H, W)``, so detectors can average or concatenate layers
without resampling. Preprocessing (resize + normalisation) lives here too, so the torch path,
the ONNX path and the station all feed the network identical tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from inspector.errors import InspectorError


class MissingWeightsError(InspectorError, FileNotFoundError):
    """Weights for a named backbone are not on this machine. The message says what to place where."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Preprocess:
    """Resize to a square ``size`` and normalise: ``(x/255 - mean) / std``, channels first."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        if (h, w) == (self.size, self.size):
            return rgb
        shrink = h > self.size or w > self.size
        return cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> Tensor:
        """RGB uint8 image(s) (H,W,3) -> float32 ``Tensor[B,3,size,size]`` on the CPU."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        batch = np.stack([self.resize(np.asarray(im)) for im in images]).astype(np.float32) / 255.0
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        batch = (batch - mean) / std
        return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The TF-Lite EfficientNet checkpoints expect inputs scaled as (x - 127) / 128, i.e. roughly [-1, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass
class BackboneInfo:
    """What `inspector backbones` prints about one registered backbone."""

    name: str
    family: str
    layers: tuple[str, ...]
    dims: dict[str, int]
    stride: int
    image_size: int
    weights: str  # file path, "package", or "random (tests only)"
    weights_present: bool
    notes: str = ""
    extra: dict = field(default_factory=dict)


class PatchBackbone(nn.Module):
    """Base class: subclasses implement :meth:`_features` and set the attributes below.

    Attributes:
        name: registry name (``efficientnet-lite0``, ``clip/ViT-B-16``, ...).
        layers: names of the returned feature layers, shallow to deep.
        dims: channel count per layer.
        stride: input pixels per patch along each side (``h = H // stride``).
        preprocess: the :class:`Preprocess` that makes this backbone's input tensors.
        is_random: True only for the tiny test configs; never for a named production backbone.
    """

    name: str = "base"
    layers: tuple[str, ...] = ()
    dims: dict[str, int] = {}
    stride: int = 8
    preprocess: Preprocess
    is_random: bool = False

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.stride, width // self.stride

    def _features(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``Tensor[B,3,H,W]`` (preprocessed) -> ``{layer: Tensor[B,h,w,C]}`` float32 on ``self.device``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected Tensor[B,3,H,W], got {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True)
        with self.autocast():
            feats = self._features(x)
        return {k: v.float() for k, v in feats.items()}

    def autocast(self):
        """bf16 autocast on CUDA (tensor cores); exact fp32 on CPU."""
        if self.device.type == "cuda" and not getattr(self, "fp32", False):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def embed(self, images: Tensor) -> dict[str, Tensor]:
        """:meth:`forward` without autograd: the normal entry point for inference."""
        return self(images)

    def info(self) -> BackboneInfo:
        return BackboneInfo(
            name=self.name,
            family=type(self).__name__,
            layers=tuple(self.layers),
            dims=dict(self.dims),
            stride=self.stride,
            image_size=self.preprocess.size,
            weights="random (tests only)" if self.is_random else "loaded",
            weights_present=True,
        )


def local_average(x: Tensor, k: int = 3) -> Tensor:
    """PatchCore's local neighbourhood aggregation: k x k mean over a ``[B,C,h,w]`` map, same size."""
    if k <= 1:
        return x
    return nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


def to_grid(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample ``[B,C,h,w]`` to ``size`` (bilinear) when needed."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
