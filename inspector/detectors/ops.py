"""Map operations every detector shares: Gaussian smoothing, patch -> pixel maps, robust max.

One statement each, so the detectors (and their exported graphs: everything here traces) smooth
and upsample alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def gaussian_kernel1d(sigma: float, device=None) -> Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: Tensor, sigma: float, padding: str = "reflect") -> Tensor:
    """Separable Gaussian blur of ``[B,H,W]`` maps with reflect padding (PatchCore uses sigma=4).

    ``padding="symmetric"`` repeats the edge pixel (``d c b a | a b c d``): scipy's
    ``gaussian_filter`` default, used by the official AnomalyCLIP test; radius ``int(4 sigma + 0.5)``
    as scipy's ``truncate=4``.
    """
    if sigma <= 0:
        return maps
    if padding == "symmetric":
        r = int(4.0 * sigma + 0.5)
        x = torch.arange(-r, r + 1, dtype=torch.float64, device=maps.device)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = (k / k.sum()).to(maps.dtype)
        y = maps[:, None]
        for dim in (-1, -2):
            n = y.shape[dim]
            idx = torch.arange(-r, n + r, device=maps.device)
            idx = torch.where(idx < 0, -idx - 1, idx)
            idx = torch.where(idx >= n, 2 * n - idx - 1, idx).remainder(max(1, 2 * n))
            idx = torch.where(idx >= n, 2 * n - idx - 1, idx)
            y = y.index_select(dim, idx)
            y = F.conv2d(y, k.view(1, 1, 1, -1) if dim == -1 else k.view(1, 1, -1, 1))
        return y[:, 0]
    if padding != "reflect":
        raise ValueError(f"padding must be reflect or symmetric, got {padding!r}")
    k = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    r = k.numel() // 2
    x = maps[:, None]
    pad_w = min(r, x.shape[-1] - 1)
    pad_h = min(r, x.shape[-2] - 1)
    if pad_w < r or pad_h < r:  # tiny maps: fall back to replicate-safe padding size
        x = F.pad(x, (r, r, r, r), mode="replicate")
    else:
        x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def patch_to_pixel(patch_scores: Tensor, size: tuple[int, int], sigma: float = 4.0, *,
                   align_corners: bool = False) -> Tensor:
    """``[B,h,w]`` patch scores -> ``[B,H,W]`` pixel map: bilinear upsampling then Gaussian smoothing.

    ``align_corners=True`` is the official MuSc upsampling (corner patch centres on corner pixels).
    """
    up = F.interpolate(patch_scores[:, None].float(), size=size, mode="bilinear", align_corners=align_corners)[:, 0]
    return gaussian_blur(up, sigma)


def top_mean(maps: Tensor, fraction: float = 0.01) -> Tensor:
    """Image score as the mean of the top ``fraction`` of map values (robust max)."""
    flat = maps.flatten(1)
    k = max(1, int(round(flat.shape[1] * fraction)))
    return flat.topk(k, dim=1).values.mean(1)


__all__ = ["gaussian_blur", "gaussian_kernel1d", "patch_to_pixel", "top_mean"]
