"""MuSc's scoring stages as pure tensor functions: LNAMD, MSM, position compensation, RsCIN.

Formulas follow the official xrli-U/MuSc code (its ``models/musc.py``); this file's code is
vectorised and chunked (:mod:`inspector.detectors.musc.budget` sizes the blocks).

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
   ``(0, 0.3)``: the mean of the smallest 30%). The interval is clamped to hold at least one image
   (:func:`interval_bounds`), where the official one is empty (NaN) for N < 5.
3. **RsCIN** (:func:`rscin`): min-max normalise the image scores over the set; ``W = F F^T`` over
   L2-normalised image-level features; for each ``k`` in ``k_list`` keep the ``k`` largest entries
   of each row of ``W`` (the window mask, self included), weights clamped at 0, row-normalise and
   smooth the scores with it (:func:`mmo`); average over ``k``; map back to the raw score range (a
   monotone affine map, so the ranking is the official one).

**Aligned parts** (``align_radius``): for fixtured parts a patch only needs comparing with the
patches of the other images within ``align_radius`` grid cells of the same location (the window
is visited offset by offset; out-of-image neighbours excluded). Cost ``O(N^2 P K C)`` instead of
``O(N^2 P^2 C)``; ``align_radius >= max(h, w)`` reproduces the unaligned result exactly.

Precision: ``"fp32"`` exact IEEE fp32; ``"tf32"`` TF32 tensor-core matmuls on CUDA; ``"bf16"``
bf16 operands with fp32 accumulation (about 3 significant digits on the squared distances).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from inspector.detectors.musc.budget import auto_chunk, default_block_bytes, msm_memory

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, as in the official LNAMD


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
    block_bytes = block_bytes or default_block_bytes(dev)
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
        chunk = chunk_size or auto_chunk(n, p, p, elem, block_bytes)
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


__all__ = ["LN_EPS", "interval_bounds", "lnamd", "mmo", "msm", "position_compensate", "rscin"]
