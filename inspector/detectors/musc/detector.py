"""MuSc: zero-shot anomaly classification and segmentation by mutual scoring of unlabeled images.

Li et al., ICLR 2024, "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with
Mutual Scoring of the Unlabeled Images". No normal samples: every image of a batch is scored
against the other images of the same batch, because defects are rare and local while normal
patches find near-duplicates in most other images.

Pipeline (this file's own vectorised code; formulas follow the official xrli-U/MuSc code):

1. **LNAMD** (:func:`lnamd`), per backbone layer and aggregation degree ``r`` (default 1, 3, 5):
   LayerNorm of each image's whole ``[C,h,w]`` feature map (no affine), then every patch is
   replaced by the mean of its ``r x r`` neighbourhood (zero padding), then L2-normalised. The
   official code builds the ``C*r*r`` neighbourhood vector with ``Unfold`` and reduces it to ``C``
   with ``adaptive_avg_pool1d``; because the vector is channel-major, each output channel is exactly
   the ``r x r`` mean of that channel, i.e. an average pool. Zero padding versus "valid only"
   counting only changes a border patch's length, which the L2 normalisation removes.
2. **MSM** (:func:`msm`), per layer and ``r``: for patch ``p`` of image ``i`` and every other image
   ``j``, ``d_ij(p) = min_q ||z_i(p) - z_j(q)||``; sort the ``N-1`` values ascending and average the
   ones at sorted positions ``[floor(lo*(N-1)), floor(hi*(N-1)))`` (``topmin=(lo, hi)``, official
   ``(0, 0.3)``: the mean of the smallest 30%). The patch score is the mean over layers and ``r``.
   Pixel maps: bilinear upsampling to the input size then Gaussian smoothing (``sigma``).
3. **RsCIN** (:func:`rscin`): image score = max of the patch-score map; min-max normalise the
   scores over the set; ``W = F F^T`` over L2-normalised image-level features; for each ``k`` in
   ``rscin_k`` keep the ``k`` largest entries of each row of ``W`` (the window mask, self
   included), row-normalise and smooth the scores with it; average over ``k``. The result is
   mapped back to the raw score range (a monotone affine map, so the ranking is the official one)
   so scores keep the units of the maps. Image-level features: CLIP backbones' global image
   embedding (``encode_image``), else the spatial mean of the deepest returned layer.

Differences from the official code, on purpose:

* **Small N.** The official interval ``[int(lo*(N-1)), int(hi*(N-1)))`` is empty for N < 5 and the
  score is NaN. Here the interval is clamped to hold at least one image (``k_hi >= 1``,
  ``k_lo <= k_hi - 1``, ``k_hi <= N-1``): for N = 2..4 the patch score is the distance to the
  most similar other image (degraded: one defective neighbour can hide a defect, but finite and
  still ranking a lone defect first). N = 1 raises ValueError. For N >= 5 the numbers are the
  official ones. RsCIN's ``k`` values are clamped to N; when all raw scores are equal RsCIN is
  skipped (the official code divides by zero).
* RsCIN weights are clamped at 0 (cosine similarities of CNN features can be negative; with the
  self-similarity kept the row sum stays >= 1, so no division by ~0).
* ``divide_num`` splits the set into that many subsets with a seeded random permutation (the
  official split is stratified by the ground-truth defect type, which an unlabeled folder does not
  have); each subset is mutually scored on its own, RsCIN runs once over all images. Subsets never
  drop below 2 images (``divide_num`` is reduced to ``N // 2`` if needed).
* With the EfficientNet backbone the features arrive already 3x3-averaged by the backbone (its
  PatchCore-style local aggregation), so ``r = 1`` here already sees a 3x3 context.
* ``position_norm`` (default on; off = official): after averaging over layers and ``r``, the
  per-location median over the set is subtracted from every map (its mean added back, so units
  and level stay) — :func:`position_compensate`. CNN padding makes border/corner patches match
  worse in *every* image; at 128 px (16x16 grid) that border noise outranks small defects. On 9
  brick crops at 128 px with one ``synth.fallback.make_defect`` Perlin defect (16 seeds, Lite0) the
  defective crop ranked first in 13/16 sets with it against 7/16 without, and the map's peak fell
  in the defect in 16/16 against 9/16 (kind "any": first 14/16 vs 6/16, peak 14/16 vs 5/16).

Scale and memory
----------------
The MSM work is ``O(N^2 P^2 C)`` per (layer, r) with ``P = h*w`` patches. Distances are blocks of
one matmul, ``||a||^2 + ||b||^2 - 2 a.b`` folded into a single GEMM by augmenting the operands
(``[a, |a|^2, 1] . [-2b, 1, |b|^2]``), followed by a min over the patches of ``j``; the square root
is taken only on the selected minima. Images are processed in blocks of ``chunk_size`` images (a
Python loop over blocks only). Two schedules:

* **symmetric** (default when the table fits in ``table_bytes``): only blocks ``I <= J`` are
  computed; a block's row-minima give ``d_ij`` and its column-minima give ``d_ji``, halving the
  FLOPs. Keeps the full table ``[N, P, N]`` of per-image minima.
* **row band**: each block row ``I`` is computed against all ``J`` and reduced immediately; memory
  independent of N beyond the features.

Peak working memory of :func:`msm` (bytes, ``b`` = bytes per matmul output element: 4 for fp32/tf32,
2 for bf16; ``c`` = ``chunk_size``; :func:`msm_memory` evaluates it)::

    b * c^2 * P^2                       one distance block (the only large temporary)
  + 4 * N * P * N     (symmetric)  or  4 * c * P * N  (row band)     table of per-image minima
  + 2 * 4 * N * P * (C + 2)            the two augmented operand copies of the layer's features
  + 4 * N * P * C                      the LNAMD output of the layer

:class:`MuSc` adds the other phases — LNAMD (``3 * 4 * N * P * max(C)``) and the map smoothing
(about ``88 * 8 * H * W``, done 8 images at a time) — whichever is largest, plus the accumulators and
the returned maps (``8 * N * P + 4 * N * H * W``); ``last_info['predicted_peak_bytes']`` holds that
total. The caller's backbone features (``4 * N * P * sum(C_layers)``) come on top.
``chunk_size=None`` picks ``c`` so that the block stays under ``block_bytes`` (256 MiB on CPU,
1 GiB on CUDA). Aligned mode: ``3 * 4 * c * P * N`` (a block of window distances to all images,
its running minimum, the reduction) ``+ 3 * 4 * N * P * (C + 2)`` (padded keys, one shifted copy, queries)
``+ 4 * N * P * C``, independent of the window size ``K = (2*align_radius+1)^2``.

**Aligned parts** (``aligned=True``): for fixtured parts a patch only needs comparing with the
patches of the other images within ``align_radius`` grid cells of the same location (the window
is visited offset by offset; out-of-image neighbours excluded). Cost ``O(N^2 P K C)`` instead of
``O(N^2 P^2 C)``; ``align_radius >= max(h, w)`` reproduces the unaligned result exactly.

Precision: fp32 on CPU; on CUDA TF32 tensor-core matmuls by default (``precision="tf32"``),
``"bf16"`` for bf16 operands with fp32 accumulation (about 3 significant digits on the squared
distances), ``"fp32"`` for exact IEEE fp32.

Contract: ``batchwise=True``: ``score(images)`` scores the batch against itself, so results depend
on the whole batch. ``score_features`` takes already extracted backbone features so the folder
scorer can stream images through the backbone and call MuSc once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from inspector.backbones.registry import PatchBackbone
from inspector.detectors.base import AnomalyResult, patch_to_pixel

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, as in the official LNAMD

# ``official``: xrli-U/MuSc's models/musc.py (no position normalisation, no smoothing, maps
# upsampled with align_corners=True, image score = max of the upsampled map before RsCIN).
# ``project``: this repository's defaults; on held-out real data they measured better (image
# AUROC 89.7 vs 87.6 for official), so they stay the default.
PRESETS: dict[str, dict[str, Any]] = {
    "official": {"position_norm": False, "sigma": 0.0, "align_corners": True, "image_score": "map"},
    "project": {"position_norm": True, "sigma": 4.0, "align_corners": False, "image_score": "patch"},
}
OFFICIAL_IMAGE_SIZE = 518  # configs/musc.yaml img_resize
# Official RsCIN windows per dataset (models/musc.py: VisA [1, 8, 9], MVTec AD and others [1, 2, 3]).
RSCIN_WINDOWS: dict[str, tuple[int, ...]] = {"mvtec": (1, 2, 3), "visa": (1, 8, 9), "btad": (1, 2, 3)}
MAP_GROUP = 8  # images per upsample+blur call
MAP_GROUP_BYTES_PER_PIXEL = 4 * 22  # measured working set of base.patch_to_pixel per output pixel

__all__ = [
    "MuSc",
    "PRESETS",
    "RSCIN_WINDOWS",
    "interval_bounds",
    "lnamd",
    "mmo",
    "msm",
    "msm_flops",
    "msm_memory",
    "position_compensate",
    "rscin",
]


# ---------------------------------------------------------------------------------------------
# LNAMD
# ---------------------------------------------------------------------------------------------

def lnamd(feat: Tensor, r: int) -> Tensor:
    """Local neighbourhood aggregation of one layer: ``[N,h,w,C]`` -> ``[N,h,w,C]`` unit vectors.

    LayerNorm over each image's whole ``(h, w, C)`` map (no affine, eps 1e-5), ``r x r`` mean with
    zero padding (``r`` odd), L2 normalisation per patch.
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"aggregation degree r must be odd and >= 1, got {r}")
    if feat.ndim != 4:
        raise ValueError(f"expected features [N,h,w,C], got {tuple(feat.shape)}")
    x = feat.float()
    x = F.layer_norm(x, x.shape[1:], eps=LN_EPS)
    if r > 1:
        x = F.avg_pool2d(x.permute(0, 3, 1, 2), r, stride=1, padding=r // 2, count_include_pad=True)
        x = x.permute(0, 2, 3, 1)
    return F.normalize(x, dim=-1).contiguous()


# ---------------------------------------------------------------------------------------------
# MSM
# ---------------------------------------------------------------------------------------------

def interval_bounds(n_ref: int, topmin: Sequence[float] = (0.0, 0.3)) -> tuple[int, int]:
    """Sorted positions ``[k_lo, k_hi)`` averaged among ``n_ref`` per-image minima.

    Official rule ``k = int(fraction * n_ref)``, clamped so that at least one image is averaged
    (the official code gives an empty interval, hence NaN, for ``n_ref < 4`` with ``hi = 0.3``).
    """
    lo, hi = float(topmin[0]), float(topmin[1])
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"topmin must satisfy 0 <= lo < hi <= 1, got {tuple(topmin)}")
    if n_ref < 1:
        raise ValueError("mutual scoring needs at least 2 images (1 reference per image)")
    k_hi = min(max(int(hi * n_ref), 1), n_ref)
    k_lo = min(int(lo * n_ref), k_hi - 1)
    return k_lo, k_hi


def _auto_chunk(n: int, cols_per_image: int, p: int, elem_bytes: int, block_bytes: int) -> int:
    """Images per block so that a ``[c*p, c*cols]`` block stays under ``block_bytes``."""
    per_pair = p * cols_per_image * elem_bytes
    return int(max(1, min(n, math.isqrt(max(1, block_bytes // per_pair)))))


def _default_block_bytes(device: torch.device) -> int:
    return (1 << 30) if device.type == "cuda" else (256 << 20)


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device):
    """TF32 for fp32 matmuls inside the block on CUDA, restoring the global setting afterwards."""
    if device.type != "cuda" or precision != "tf32":
        yield
        return
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:  # pragma: no cover - older torch
        old = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = old


def _gemm(a: Tensor, b_t: Tensor, precision: str) -> Tensor:
    """``a @ b_t`` (b_t already transposed). bf16: bf16 operands, fp32 accumulation inside the
    GEMM, bf16 output (the squared distance is complete before rounding, so the output rounding
    costs ~0.4% of d^2; the operand rounding dominates)."""
    if precision == "bf16":
        return torch.mm(a.to(torch.bfloat16), b_t.to(torch.bfloat16))
    return torch.mm(a, b_t)


def _augment(z: Tensor) -> tuple[Tensor, Tensor]:
    """Operands whose product is the squared distance: ``[z, |z|^2, 1] . [-2z, 1, |z|^2]``."""
    sq = (z * z).sum(-1, keepdim=True)
    one = torch.ones_like(sq)
    return torch.cat([z, sq, one], -1), torch.cat([-2.0 * z, one, sq], -1)


def _reduce_interval(table: Tensor, k_lo: int, k_hi: int) -> Tensor:
    """``[b, P, N]`` squared minima (self = +inf) -> ``[b, P]`` interval mean of the distances."""
    vals = table.topk(k_hi, dim=-1, largest=False, sorted=True).values[..., k_lo:k_hi]
    return vals.clamp_min(0).sqrt().mean(-1)


def msm(
    z: Tensor,
    topmin: Sequence[float] = (0.0, 0.3),
    *,
    chunk_size: int | None = None,
    symmetric: bool | None = None,
    align_radius: int | None = None,
    precision: str = "fp32",
    block_bytes: int | None = None,
    table_bytes: int = 1 << 30,
    stats: dict | None = None,
) -> Tensor:
    """Mutual scoring of one layer: ``z [N,h,w,C]`` (LNAMD output) -> patch scores ``[N,h,w]``.

    ``align_radius``: None compares with every patch of the other images; an int restricts the
    comparison to a ``(2R+1)^2`` window around the same grid location (aligned parts).
    ``symmetric``: None = auto (use the half-FLOP schedule when the ``[N,P,N]`` fp32 table is at
    most ``table_bytes``). ``stats`` (optional dict) accumulates ``flops`` (matmul FLOPs actually
    issued, counting the two augmentation columns) and ``blocks``.
    """
    if z.ndim != 4:
        raise ValueError(f"expected features [N,h,w,C], got {tuple(z.shape)}")
    n, h, w, c = z.shape
    p = h * w
    k_lo, k_hi = interval_bounds(n - 1, topmin)
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be fp32, tf32 or bf16, got {precision!r}")
    dev = z.device
    elem = 2 if precision == "bf16" else 4
    block_bytes = block_bytes or _default_block_bytes(dev)
    stats = stats if stats is not None else {}
    stats.setdefault("flops", 0)
    stats.setdefault("blocks", 0)
    out = torch.empty(n, p, device=dev, dtype=torch.float32)
    zf = z.float().reshape(n, p, c)

    with torch.inference_mode(), _matmul_precision(precision, dev):
        if align_radius is not None:
            _msm_aligned(zf, h, w, int(align_radius), k_lo, k_hi, chunk_size, precision, block_bytes,
                         out, stats)
            return out.reshape(n, h, w)

        q_aug, k_aug = _augment(zf)
        chunk = chunk_size or _auto_chunk(n, p, p, elem, block_bytes)
        chunk = max(1, min(int(chunk), n))
        starts = list(range(0, n, chunk))
        if symmetric is None:
            symmetric = n * p * n * 4 <= table_bytes
        ca = c + 2
        stats["chunk"], stats["symmetric"] = chunk, bool(symmetric)
        stats["peak_bytes"] = max(stats.get("peak_bytes", 0),
                                  msm_memory(n, p, c, chunk=chunk, symmetric=symmetric, elem_bytes=elem))

        if symmetric:
            table = torch.empty(n, p, n, device=dev, dtype=torch.float32)
            for bi, i0 in enumerate(starts):
                i1 = min(i0 + chunk, n)
                a = q_aug[i0:i1].reshape(-1, ca)
                for j0 in starts[bi:]:
                    j1 = min(j0 + chunk, n)
                    d2 = _gemm(a, k_aug[j0:j1].reshape(-1, ca).T, precision)
                    d2 = d2.view(i1 - i0, p, j1 - j0, p)
                    table[i0:i1, :, j0:j1] = d2.amin(3)
                    if j0 != i0:
                        table[j0:j1, :, i0:i1] = d2.amin(1).permute(1, 2, 0)
                    stats["flops"] += 2 * (i1 - i0) * p * (j1 - j0) * p * ca
                    stats["blocks"] += 1
                    del d2
            idx = torch.arange(n, device=dev)
            table[idx, :, idx] = float("inf")
            for i0 in starts:  # reduce in bands to bound the topk temporaries
                i1 = min(i0 + chunk, n)
                out[i0:i1] = _reduce_interval(table[i0:i1], k_lo, k_hi)
            del table
        else:
            for i0 in starts:
                i1 = min(i0 + chunk, n)
                a = q_aug[i0:i1].reshape(-1, ca)
                band = torch.empty(i1 - i0, p, n, device=dev, dtype=torch.float32)
                for j0 in starts:
                    j1 = min(j0 + chunk, n)
                    d2 = _gemm(a, k_aug[j0:j1].reshape(-1, ca).T, precision)
                    band[:, :, j0:j1] = d2.view(i1 - i0, p, j1 - j0, p).amin(3)
                    stats["flops"] += 2 * (i1 - i0) * p * (j1 - j0) * p * ca
                    stats["blocks"] += 1
                    del d2
                ii = torch.arange(i1 - i0, device=dev)
                band[ii, :, ii + i0] = float("inf")
                out[i0:i1] = _reduce_interval(band, k_lo, k_hi)
    return out.reshape(n, h, w)


def _msm_aligned(zf: Tensor, h: int, w: int, radius: int, k_lo: int, k_hi: int, chunk_size: int | None,
                 precision: str, block_bytes: int, out: Tensor, stats: dict) -> None:
    """Aligned-parts MSM: each patch against the ``(2R+1)^2`` window of the other images.

    A loop over the ``K`` window offsets (not over patches or pairs): the augmented keys of all
    images shifted by the offset, ``[P, N, C+2]``, meet the queries of a band of images in one GEMM
    batched over grid locations, ``[P, bi, C+2] x [P, C+2, N]``, and a running minimum keeps the
    nearest so far. Out-of-image neighbours carry ``|b|^2 = 1e20`` so they never win (offset 0 is
    always inside the image).
    """
    n, p, c = zf.shape
    if radius < 0:
        raise ValueError(f"align_radius must be >= 0, got {radius}")
    ks = 2 * radius + 1
    kk = ks * ks
    dev = zf.device
    ca = c + 2
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    z = zf.reshape(n, h, w, c)
    sq = (z * z).sum(-1)
    # built in place (no concatenation temporaries): keys [N, h+2R, w+2R, C+2], queries [P, N, C+2]
    keys = torch.zeros(n, h + 2 * radius, w + 2 * radius, ca, device=dev, dtype=torch.float32)
    keys[..., c] = 1.0
    keys[..., c + 1] = 1e20
    inner = keys[:, radius:radius + h, radius:radius + w]
    inner[..., :c].copy_(z).mul_(-2.0)
    inner[..., c + 1] = sq
    queries = torch.empty(p, n, ca, device=dev, dtype=torch.float32)
    queries[..., :c] = zf.permute(1, 0, 2)
    queries[..., c] = sq.reshape(n, p).T
    queries[..., c + 1] = 1.0
    del inner, sq
    if dtype != torch.float32:
        keys, queries = keys.to(dtype), queries.to(dtype)
    chunk = chunk_size or max(1, min(n, block_bytes // max(1, 4 * p * n)))
    chunk = max(1, min(int(chunk), n))
    stats["chunk"], stats["symmetric"] = chunk, False
    stats["peak_bytes"] = max(stats.get("peak_bytes", 0), msm_memory(n, p, c, chunk=chunk, kk=kk))
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        bi = i1 - i0
        q = queries[:, i0:i1]
        best = None
        for dy in range(ks):
            for dx in range(ks):
                shifted = keys[:, dy:dy + h, dx:dx + w].reshape(n, p, ca).permute(1, 2, 0).contiguous()
                d2 = torch.bmm(q, shifted)  # [P, bi, N]
                best = d2.float() if best is None else torch.minimum(best, d2, out=best)
                stats["flops"] += 2 * p * bi * n * ca
                stats["blocks"] += 1
                del shifted, d2
        band = best.permute(1, 0, 2)  # [bi, P, N]
        ii = torch.arange(bi, device=dev)
        band[ii, :, ii + i0] = float("inf")
        out[i0:i1] = _reduce_interval(band, k_lo, k_hi)


def msm_flops(n: int, p: int, c: int, *, symmetric: bool = True, chunk: int | None = None,
              kk: int | None = None) -> int:
    """Matmul FLOPs of one :func:`msm` call (as counted in ``stats['flops']``)."""
    if kk is not None:
        return 2 * p * n * n * kk * (c + 2)
    chunk = chunk or n
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    total = 0
    for a, si in enumerate(sizes):
        for b, sj in enumerate(sizes):
            if symmetric and b < a:
                continue
            total += 2 * si * p * sj * p * (c + 2)
    return total


def position_compensate(patch: Tensor) -> Tensor:
    """Remove the per-location baseline of ``[N,h,w]`` patch scores, keeping their overall level.

    ``s'(i,p) = s(i,p) - (m(p) - mean_p m(p))`` with ``m(p)`` the (lower) median over the images
    of the set at grid location ``p``. Not in the paper: CNN features carry padding artefacts at
    the image border (a quarter of a 16x16 grid), which make border and corner patches match worse
    than interior ones in every image and hide small defects at the image-score level. Under
    MuSc's own assumption (a location is defective in a minority of the images) the median is a
    normal image's score there, so a lone defect keeps its full excess. Clamped at 0 (a distance).
    """
    base = patch.median(0).values
    return (patch - (base - base.mean())).clamp_min(0)


def msm_memory(n: int, p: int, c: int, *, chunk: int, symmetric: bool = False, elem_bytes: int = 4,
               kk: int | None = None) -> int:
    """Predicted peak working bytes of one :func:`msm` call (the docstring's formula).

    Distance block + table of per-image minima + augmented operands + the LNAMD output ``z``.
    Aligned mode (``kk`` = window size, which costs time but no memory): a ``[P, c, N]`` block and
    the running minimum, padded keys, one shifted copy, queries, ``z``.
    """
    if kk is not None:
        return 4 * (3 * chunk * p * n + 3 * n * p * (c + 2) + n * p * c)
    block = elem_bytes * chunk * chunk * p * p
    table = 4 * (n * p * n if symmetric else chunk * p * n)
    return block + table + 2 * 4 * n * p * (c + 2) + 4 * n * p * c


# ---------------------------------------------------------------------------------------------
# RsCIN
# ---------------------------------------------------------------------------------------------

def mmo(sim: Tensor, scores: Tensor, k_list: Sequence[int] = (1, 2, 3)) -> Tensor:
    """Multi-window mask operation: mean over ``k`` of the row-normalised kNN-masked smoothing.

    For each ``k``: keep the ``k`` largest entries of each row of ``sim`` (others 0), weights
    clamped at 0, ``P = D^-1 W_k``, ``s_k = P s``. ``k`` is clamped to ``[1, N]``.
    """
    n = sim.shape[0]
    sim = sim.double()
    s = scores.double()
    outs = []
    for k in k_list:
        k = min(max(int(k), 1), n)
        idx = sim.topk(k, dim=1).indices
        wk = torch.zeros_like(sim).scatter_(1, idx, sim.gather(1, idx).clamp_min(0))
        row = wk.sum(1, keepdim=True)
        # A row whose k kept similarities are all <= 0 keeps its own score.
        pk = torch.where(row > 0, wk / row.clamp_min(1e-300), torch.eye(n, dtype=sim.dtype, device=sim.device))
        outs.append(pk @ s)
    return torch.stack(outs, -1).mean(-1)


def rscin(scores: Tensor, image_features: Tensor | None, k_list: Sequence[int] = (1, 2, 3)) -> Tensor:
    """Re-score image scores ``[N]`` with the image-level neighbourhood of ``image_features [N,D]``.

    Returns scores in the input's range (official RsCIN output ``s'`` in [0,1] mapped back by
    ``min + s' * (max - min)``); identity when there are no features, ``0 in k_list``, or all
    scores are equal.
    """
    if image_features is None or 0 in k_list or scores.numel() < 2:
        return scores.clone()
    s = scores.double()
    lo, hi = s.min(), s.max()
    if not torch.isfinite(hi - lo) or (hi - lo) <= 0:
        return scores.clone()
    norm = (s - lo) / (hi - lo)
    f = F.normalize(image_features.double().reshape(len(s), -1), dim=-1)
    new = mmo(f @ f.T, norm, k_list)
    return (lo + new * (hi - lo)).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------

class MuSc:
    """Zero-shot MuSc detector on a shared :class:`PatchBackbone` (see the module docstring).

    Args:
        backbone: the patch backbone; ``score`` runs it, ``score_features`` takes its output.
        r_list: LNAMD aggregation degrees (odd).
        topmin: MSM interval ``(lo, hi)`` of the sorted per-image minima, fractions of ``N-1``.
        layers: backbone layers to use (default: all returned layers).
        rscin: re-score image scores with RsCIN.
        rscin_k: RsCIN window sizes (None: by ``dataset``; official (1, 2, 3) MVTec AD, (1, 8, 9) VisA).
        aligned: aligned-parts mode (compare only within ``align_radius`` grid cells).
        align_radius: window half-size in patch-grid cells for ``aligned``.
        chunk_size: images per distance block; None = auto from ``block_bytes``.
        divide_num: split the set into this many subsets, each mutually scored on its own.
        sigma: Gaussian smoothing of the pixel maps (pixels at the input resolution; None: preset).
        position_norm: (None: preset) subtract the per-location median baseline over the set
            (:func:`position_compensate`; not in the paper, off = the official pipeline).
        precision: ``fp32`` | ``tf32`` | ``bf16`` for the distance matmuls; None = tf32 on CUDA,
            fp32 on CPU (bf16 on CPU is emulated and slow).
        symmetric: force / forbid the half-FLOP schedule (None = auto by table size).
        batch_size: images per backbone forward in :meth:`score`.
        seed: seed of the ``divide_num`` split.
        preset: ``project`` (default: position_norm + sigma 4, measured better on held-out real
            data) or ``official`` (xrli-U/MuSc: no position norm, no blur, ``align_corners=True``,
            image score from the upsampled map). Explicit arguments override the preset.
        align_corners: bilinear upsampling of the patch maps (official: True).
        image_score: ``patch`` (max of the patch grid) or ``map`` (max of the upsampled map, official).
        dataset: ``mvtec`` | ``visa`` | ``btad``: the official RsCIN windows when ``rscin_k`` is None.
        pos_interp: CLIP position-embedding interpolation (None: the backbone's, bicubic as official).

    After each call, ``last_info`` holds diagnostics: raw (pre-RsCIN) image scores, patch-level
    score maps, FLOPs issued and timings.
    """

    name: ClassVar[str] = "musc"
    batchwise: ClassVar[bool] = True
    needs_fit: ClassVar[bool] = False

    def __init__(
        self,
        backbone: PatchBackbone,
        r_list: Sequence[int] = (1, 3, 5),
        topmin: Sequence[float] = (0.0, 0.3),
        layers: Sequence[str] | None = None,
        rscin: bool = True,
        rscin_k: Sequence[int] | None = None,
        aligned: bool = False,
        align_radius: int = 1,
        chunk_size: int | None = None,
        divide_num: int = 1,
        sigma: float | None = None,
        position_norm: bool | None = None,
        precision: str | None = None,
        symmetric: bool | None = None,
        batch_size: int = 16,
        seed: int = 0,
        preset: str = "project",
        align_corners: bool | None = None,
        image_score: str | None = None,
        dataset: str | None = None,
        pos_interp: str | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"unknown MuSc preset {preset!r}; choose from {sorted(PRESETS)}")
        p = PRESETS[preset]
        self.preset = preset
        if dataset is not None and dataset not in RSCIN_WINDOWS:
            raise ValueError(f"unknown dataset {dataset!r} for RsCIN windows; choose from {sorted(RSCIN_WINDOWS)}")
        self.dataset = dataset
        if rscin_k is None:
            rscin_k = RSCIN_WINDOWS[dataset or "mvtec"]
        sigma = p["sigma"] if sigma is None else sigma
        position_norm = p["position_norm"] if position_norm is None else position_norm
        self.align_corners = bool(p["align_corners"] if align_corners is None else align_corners)
        self.image_score = p["image_score"] if image_score is None else image_score
        if self.image_score not in ("patch", "map"):
            raise ValueError(f"image_score must be 'patch' (max of the patch grid) or 'map' (max of the "
                             f"upsampled map), got {self.image_score!r}")
        self.backbone = backbone
        self.pos_interp = pos_interp  # CLIP position interpolation (None: the backbone's, bicubic as official)
        self.r_list = tuple(int(r) for r in r_list)
        for r in self.r_list:
            if r < 1 or r % 2 == 0:
                raise ValueError(f"r_list entries must be odd and >= 1, got {r}")
        if not self.r_list:
            raise ValueError("r_list must not be empty")
        self.topmin = (float(topmin[0]), float(topmin[1]))
        interval_bounds(4, self.topmin)  # validates
        self.layers = tuple(layers) if layers is not None else None
        self.rscin = bool(rscin)
        self.rscin_k = tuple(int(k) for k in rscin_k)
        self.aligned = bool(aligned)
        self.align_radius = int(align_radius)
        if self.align_radius < 0:
            raise ValueError("align_radius must be >= 0")
        self.chunk_size = int(chunk_size) if chunk_size else None
        self.divide_num = max(1, int(divide_num))
        self.sigma = float(sigma)
        self.position_norm = bool(position_norm)
        if precision not in (None, "fp32", "tf32", "bf16"):
            raise ValueError(f"precision must be fp32, tf32, bf16 or None, got {precision!r}")
        self.precision = precision
        self.symmetric = symmetric
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.last_info: dict[str, Any] = {}

    @classmethod
    def default_image_size(cls, backbone: str, config: dict[str, Any] | None = None) -> int | None:
        """518 px for the official preset on ViT-L-14-336 (configs/musc.yaml ``img_resize``), else
        None (the backbone's default size)."""
        if (config or {}).get("preset") == "official" and backbone == "clip/ViT-L-14-336":
            return OFFICIAL_IMAGE_SIZE
        return None

    # -- protocol ----------------------------------------------------------------------------
    def fit(self, images: Tensor | None = None) -> MuSc:
        """Zero-shot: nothing to learn."""
        return self

    def config(self) -> dict[str, Any]:
        return {
            "backbone": getattr(self.backbone, "name", None),
            "r_list": list(self.r_list),
            "topmin": list(self.topmin),
            "layers": list(self.layers) if self.layers is not None else None,
            "rscin": self.rscin,
            "rscin_k": list(self.rscin_k),
            "aligned": self.aligned,
            "align_radius": self.align_radius,
            "chunk_size": self.chunk_size,
            "divide_num": self.divide_num,
            "sigma": self.sigma,
            "position_norm": self.position_norm,
            "precision": self.precision,
            "symmetric": self.symmetric,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "preset": self.preset,
            "align_corners": self.align_corners,
            "image_score": self.image_score,
            "dataset": self.dataset,
            "pos_interp": self.pos_interp,
        }

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, self.config()

    @classmethod
    def from_state(cls, backbone: PatchBackbone, tensors: dict[str, Tensor] | None = None,
                   config: dict[str, Any] | None = None) -> MuSc:
        cfg = dict(config or {})
        cfg.pop("backbone", None)
        return cls(backbone, **cfg)

    # -- scoring -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def _precision(self, device: torch.device) -> str:
        if self.precision is not None:
            return self.precision
        return "tf32" if device.type == "cuda" else "fp32"

    def pass_spec(self) -> dict[str, Any]:
        """What MuSc needs from a shared :meth:`ClipBackbone.run`: the residual stream of the
        backbone's layers (the CLS token comes with every pass)."""
        return {"layers": tuple(self.backbone.layer_ids), "pos_interp": self.pos_interp}

    def from_pass(self, out) -> tuple[dict[str, Tensor], Tensor | None]:
        """Features and RsCIN's image-level features (``encode_image``: ``ln_post`` + ``proj`` of the
        CLS token) from one shared CLIP pass."""
        feats = {k: v.float() for k, v in self.backbone.pass_features(out).items()}
        glob = self.backbone.global_embedding(out.cls).float() if self.rscin else None
        return feats, glob

    @torch.inference_mode()
    def extract(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Backbone features ``{layer: [N,h,w,C]}`` and image-level features ``[N,D]`` (or None).

        CLIP backbones: one forward per image gives both (the patch tokens and the global
        embedding of the same pass). Other backbones: no image-level features (RsCIN then uses
        the spatial mean of the deepest layer).
        """
        feats: dict[str, list[Tensor]] = {}
        globals_: list[Tensor] = []
        shared = hasattr(self.backbone, "run")
        for b0 in range(0, images.shape[0], self.batch_size):
            x = images[b0:b0 + self.batch_size]
            if shared:
                with self.backbone.autocast():
                    out, g = self.from_pass(self.backbone.run(x.to(self.device), **self.pass_spec()))
                if g is not None:
                    globals_.append(g)
            else:
                out = self.backbone.embed(x)
            for k, v in out.items():
                feats.setdefault(k, []).append(v.float())
        cat = {k: torch.cat(v) for k, v in feats.items()}
        return cat, (torch.cat(globals_) if globals_ else None)

    def score(self, images: Tensor) -> AnomalyResult:
        """Score a preprocessed batch ``Tensor[N,3,H,W]`` (N >= 2) against itself."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"MuSc.score expects Tensor[N,3,H,W], got {tuple(images.shape)}")
        self._check_n(images.shape[0])
        t0 = time.perf_counter()
        feats, glob = self.extract(images)
        t_bb = time.perf_counter() - t0
        res = self.score_features(feats, image_size=tuple(images.shape[-2:]), image_features=glob)
        self.last_info["backbone_s"] = t_bb
        return res

    @staticmethod
    def _check_n(n: int) -> None:
        if n < 2:
            raise ValueError(
                f"MuSc scores images against each other and needs at least 2 images, got {n} "
                "(5 or more for the paper's interval; 2-4 give a degraded nearest-image score)")

    def _layer_names(self, feats: dict[str, Tensor]) -> list[str]:
        if self.layers is None:
            return list(feats)
        missing = [k for k in self.layers if k not in feats]
        if missing:
            raise KeyError(f"MuSc: layers {missing} not in features ({list(feats)})")
        return list(self.layers)

    def _subsets(self, n: int, device: torch.device) -> list[Tensor]:
        d = min(self.divide_num, max(1, n // 2))
        if d == 1:
            return [torch.arange(n, device=device)]
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g).to(device)
        return [perm[k::d].sort().values for k in range(d)]

    def score_features(self, feats: dict[str, Tensor], image_size: tuple[int, int] | None = None,
                       image_features: Tensor | None = None) -> AnomalyResult:
        """MuSc on stored backbone features.

        Args:
            feats: ``{layer: Tensor[N,h,w,C]}`` as returned by the backbone (all layers on one grid).
            image_size: ``(H, W)`` of the pixel maps; default ``backbone.stride * (h, w)``.
            image_features: ``[N,D]`` image-level features for RsCIN; default: spatial mean of the
                deepest used layer.
        """
        names = self._layer_names(feats)
        if not names:
            raise ValueError("MuSc: no feature layers given")
        first = feats[names[0]]
        n, h, w = first.shape[:3]
        self._check_n(n)
        for k in names:
            if tuple(feats[k].shape[:3]) != (n, h, w):
                raise ValueError(f"MuSc: layer {k} has shape {tuple(feats[k].shape)}, expected [{n},{h},{w},C]")
        if image_features is not None and image_features.shape[0] != n:
            raise ValueError(f"MuSc: image_features has {image_features.shape[0]} rows for {n} images")
        if image_size is None:
            s = getattr(self.backbone, "stride", 8)
            image_size = (h * s, w * s)
        dev = self.device if first.device.type == "cpu" and self.device.type != "cpu" else first.device
        precision = self._precision(dev)
        stats: dict[str, Any] = {"flops": 0, "blocks": 0}
        t0 = time.perf_counter()
        patch = torch.zeros(n, h, w, device=dev, dtype=torch.float32)
        for idx in self._subsets(n, dev):
            acc = torch.zeros(len(idx), h, w, device=dev, dtype=torch.float32)
            for name in names:
                f = feats[name].to(dev)[idx] if len(idx) < n else feats[name].to(dev)
                for r in self.r_list:
                    z = lnamd(f, r)
                    acc += msm(z, self.topmin, chunk_size=self.chunk_size, symmetric=self.symmetric,
                               align_radius=self.align_radius if self.aligned else None,
                               precision=precision, stats=stats)
                    del z
            acc /= len(names) * len(self.r_list)
            if self.position_norm:
                acc = position_compensate(acc)
            patch[idx] = acc
        t_msm = time.perf_counter() - t0
        # Whole-call model (the input features are the caller's): the largest of the phases — MSM's
        # working set, LNAMD's three copies of the widest layer, the map smoothing of one group —
        # plus the score accumulators and the returned maps.
        n_sub = max(len(i) for i in self._subsets(n, dev))
        c_max = max(int(feats[k].shape[-1]) for k in names)
        hw_px = int(image_size[0]) * int(image_size[1])
        stats["call_peak_bytes"] = (max(stats.get("peak_bytes", 0), 3 * 4 * n_sub * h * w * c_max,
                                        MAP_GROUP_BYTES_PER_PIXEL * min(n, MAP_GROUP) * hw_px)
                                    + 4 * n * h * w * 2 + 4 * n * hw_px)
        # Upsampling + Gaussian smoothing in groups: the blur's convolutions need ~20 map-sized
        # buffers per image, which would dominate the peak for a large set at full resolution.
        maps = torch.cat([patch_to_pixel(patch[g:g + MAP_GROUP], tuple(image_size), self.sigma,
                                         align_corners=self.align_corners)
                          for g in range(0, n, MAP_GROUP)])
        # Image score before RsCIN: max of the patch grid, or (official) of the upsampled map.
        raw = (maps.flatten(1) if self.image_score == "map" else patch.flatten(1)).amax(1)
        if self.rscin:
            if image_features is None:
                image_features = feats[names[-1]].to(dev).float().mean((1, 2))
            scores = rscin(raw, image_features.to(dev).float(), self.rscin_k)
        else:
            scores = raw.clone()
        self.last_info = {
            "raw_scores": raw.detach().cpu(),
            "patch_scores": patch.detach().cpu(),
            "flops": stats["flops"],
            "blocks": stats["blocks"],
            "chunk": stats.get("chunk"),
            "symmetric": stats.get("symmetric"),
            "predicted_peak_bytes": stats.get("call_peak_bytes", 0),
            "predicted_msm_peak_bytes": stats.get("peak_bytes", 0),
            "msm_s": t_msm,
            "precision": precision,
            "device": str(dev),
        }
        return AnomalyResult(maps, scores.float()).cpu()
