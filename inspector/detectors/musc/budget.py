"""MuSc's time and memory model: the FLOPs and peak bytes of mutual scoring, and the block size.

Why a model: MSM is ``O(N^2 P^2 C)`` per (layer, r) with ``P = h*w`` patches, so a large set at
full resolution runs out of memory long before it runs out of time unless the distance work is
cut into blocks sized from a prediction. :func:`~inspector.detectors.musc.torch_model.msm` sizes
its blocks with :func:`auto_chunk` and records :func:`msm_memory`; ``bench/musc.py`` measures
both against this model.

Distances are blocks of one matmul, ``||a||^2 + ||b||^2 - 2 a.b`` folded into a single GEMM by
augmenting the operands (``[a, |a|^2, 1] . [-2b, 1, |b|^2]``), followed by a min over the patches
of ``j``; the square root is taken only on the selected minima. Images are processed in blocks of
``chunk_size`` images (a Python loop over blocks only). Two schedules:

* **symmetric** (default when the table fits in ``table_bytes``): only blocks ``I <= J`` are
  computed; a block's row-minima give ``d_ij`` and its column-minima give ``d_ji``, halving the
  FLOPs. Keeps the full table ``[N, P, N]`` of per-image minima.
* **row band**: each block row ``I`` is computed against all ``J`` and reduced immediately; memory
  independent of N beyond the features.

Peak working memory of ``msm`` (bytes, ``b`` = bytes per matmul output element: 4 for fp32/tf32,
2 for bf16; ``c`` = ``chunk_size``; :func:`msm_memory` evaluates it)::

    b * c^2 * P^2                       one distance block (the only large temporary)
  + 4 * N * P * N     (symmetric)  or  4 * c * P * N  (row band)     table of per-image minima
  + 2 * 4 * N * P * (C + 2)            the two augmented operand copies of the layer's features
  + 4 * N * P * C                      the LNAMD output of the layer

``MuSc.score_features`` adds the other phases -- LNAMD (``3 * 4 * N * P * max(C)``) and the map
smoothing (:data:`MAP_GROUP_BYTES_PER_PIXEL` per output pixel, :data:`MAP_GROUP` images at a time)
-- whichever is largest, plus the accumulators and the returned maps (``8 * N * P + 4 * N * H * W``):
:func:`call_peak_bytes`, recorded as ``last_info['predicted_peak_bytes']``. The caller's backbone
features (``4 * N * P * sum(C_layers)``) come on top. ``chunk_size=None`` picks ``c`` so that the
block stays under ``block_bytes`` (:func:`default_block_bytes`). Aligned mode:
``3 * 4 * c * P * N`` (a block of window distances to all images, its running minimum, the
reduction) ``+ 3 * 4 * N * P * (C + 2)`` (padded keys, one shifted copy, queries) ``+ 4 * N * P * C``,
independent of the window size ``K = (2*align_radius+1)^2``.
"""

from __future__ import annotations

import math

MAP_GROUP = 8  # images per upsample+blur call
MAP_GROUP_BYTES_PER_PIXEL = 4 * 22  # working set of ops.patch_to_pixel per output pixel


def auto_chunk(n: int, cols_per_image: int, p: int, elem_bytes: int, block_bytes: int) -> int:
    """Images per block so that a ``[c*p, c*cols]`` block stays under ``block_bytes``."""
    per_pair = p * cols_per_image * elem_bytes
    return int(max(1, min(n, math.isqrt(max(1, block_bytes // per_pair)))))


def default_block_bytes(device) -> int:
    """Largest distance block: 1 GiB on CUDA, 256 MiB on the CPU (``device``: a ``torch.device``)."""
    return (1 << 30) if device.type == "cuda" else (256 << 20)


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


def call_peak_bytes(msm_peak: int, n: int, n_sub: int, h: int, w: int, c_max: int, hw_px: int) -> int:
    """Whole ``score_features`` call (the input features are the caller's): the largest of the
    phases -- MSM's working set, LNAMD's three copies of the widest layer, the map smoothing of one
    group -- plus the score accumulators and the returned maps."""
    return (max(msm_peak, 3 * 4 * n_sub * h * w * c_max, MAP_GROUP_BYTES_PER_PIXEL * min(n, MAP_GROUP) * hw_px)
            + 4 * n * h * w * 2 + 4 * n * hw_px)


__all__ = ["MAP_GROUP", "MAP_GROUP_BYTES_PER_PIXEL", "auto_chunk", "call_peak_bytes", "default_block_bytes",
           "msm_flops", "msm_memory"]
