"""The network side of the diffusion generator: its hyperparameters and the UNets built from them.

``DefectGenConfig`` is what a saved model stores (``defectgen.json``) and what every other module
of the package that needs hyperparameters reads, so it sits at the bottom of the package with no
dependency on data, training or sampling; ``receptive_field`` measures a built UNet (the two-stage
design rests on the large model seeing more of the patch than the small one; a test checks it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from inspector.backbones.base import default_device


@dataclass
class DefectGenConfig:
    """Everything needed to rebuild, train and sample a :class:`DefectGen`."""

    patch: int = 64                       #: training / generation patch side (pixels)
    image_size: int | None = 256          #: defect images are resized to this short side (None: as-is)
    large_channels: tuple[int, ...] = (16, 32, 32, 64)    #: 3 down-samplings + mid attention
    small_channels: tuple[int, ...] = (16, 32)            #: 1 down-sampling, no attention
    layers_per_block: int = 1
    norm_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"   #: cosine, as Defect-Gen
    prediction_type: str = "sample"       #: x0, as Defect-Gen ("epsilon", "v_prediction" also work)
    #: the small (texture) model's own target. x0 regression is the mean, i.e. blurred texture;
    #: v keeps the high-frequency detail (on the textile: residual energy 25.7 in the generated
    #: defects vs 26.7 real, 5.6 with x0). None = same as ``prediction_type``.
    small_prediction_type: str | None = "v_prediction"
    eta: float = 0.0                      #: DDIM eta (0 deterministic given the noise, 1 ancestral)
    switch_t: int = 400                   #: large model for t >= switch_t, small model below
    overlap: float = 0.25                 #: each model also trains this fraction past the switch
    train_steps: int = 800                #: optimisation steps per model
    batch_size: int = 8
    lr: float = 3e-4
    defect_crop_prob: float = 0.9         #: crops centred on defect pixels vs anywhere
    mask_weight: float = 2.0              #: loss weight of the mask channel
    sample_steps: int = 40                #: DDIM steps at generation
    resample: int = 2                     #: RePaint resampling per step (1 = none)
    region: tuple[float, float] = (0.28, 0.45)  #: generated-region ellipse radii, fraction of patch
    min_pixels: int = 12                  #: smallest accepted defect (pixels of the patch)
    mask_smooth: float = 1.0              #: Gaussian sigma (px) on the mask channel before thresholding
    auto_scale: bool = True               #: lower image_size at fit time so most defects fit a patch
    retries: int = 3                      #: new noise before falling back
    #: a sample is rejected when its mask channel and the pixels it changed (local mean/energy
    #: difference to the normal crop, see :func:`changed_pixels`) overlap with IoU below this.
    #: Measured on a tiny model: untrained samples 0.41-0.52 (noise everywhere in the region, mask
    #: on half of it), trained ones mostly 0.6-0.85.
    min_mask_iou: float = 0.55
    gray: bool = False                    #: training images were gray -> gray output
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DefectGenConfig:
        names = {f.name: f for f in fields(cls)}
        kw = {}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    @classmethod
    def for_device(cls, device: str | torch.device | None = None, **kw) -> DefectGenConfig:
        """CPU: the defaults (minutes). CUDA: wider UNets, bigger batches, longer training."""
        dev = torch.device(device or default_device())
        base: dict = {}
        if dev.type == "cuda":
            base = dict(large_channels=(64, 128, 192, 256), small_channels=(64, 128), norm_groups=16,
                        batch_size=32, train_steps=4000, lr=2e-4, sample_steps=50)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw) -> DefectGenConfig:
        """Seconds on a CPU: for tests."""
        base = dict(patch=32, image_size=None, large_channels=(8, 16, 16), small_channels=(8, 16),
                    norm_groups=4, train_steps=30, batch_size=8, sample_steps=8, resample=1,
                    min_pixels=2, lr=1e-3)
        base.update(kw)
        return cls(**base)


def _unet(cfg: DefectGenConfig, large: bool):
    from diffusers import UNet2DModel

    ch = tuple(cfg.large_channels if large else cfg.small_channels)
    n = len(ch)
    return UNet2DModel(
        sample_size=cfg.patch, in_channels=4, out_channels=4, block_out_channels=ch,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups,
        add_attention=large, attention_head_dim=max(8, ch[-1] // 4),
        num_train_timesteps=cfg.num_train_timesteps,
    )


def receptive_field(model, size: int = 64, t: int = 500, rel: float = 1e-2) -> int:
    """Effective receptive field (pixels, side) of a UNet at the centre output pixel: the span of
    inputs whose gradient exceeds ``rel`` x the largest (GroupNorm statistics couple every pixel
    weakly, so the strict, non-zero-gradient field is always the whole input)."""
    x = torch.zeros(1, 4, size, size, requires_grad=True, device=next(model.parameters()).device)
    out = model(x, torch.tensor([t], device=x.device)).sample
    out[0, :, size // 2, size // 2].sum().backward()
    a = x.grad[0].abs().sum(0)
    g = a > rel * a.max()
    ys, xs = torch.nonzero(g, as_tuple=True)
    if len(ys) == 0:
        return 0
    return int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)


__all__ = ["DefectGenConfig", "receptive_field"]
