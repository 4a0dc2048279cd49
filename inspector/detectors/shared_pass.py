"""One CLIP forward for several zero-shot detectors on the same images (MuSc + AnomalyCLIP).

Why: MuSc needs the residual-stream patch tokens of 4 blocks and the global embedding;
AnomalyCLIP needs the V-V (DPAM) path of its feature layers and the final CLS token. All of them
branch from the same residual stream, so one :meth:`~inspector.backbones.vit.ClipBackbone.run`
per image serves both: the union of what each detector's ``pass_spec()`` asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from inspector.backbones.vit import ClipBackbone
from inspector.detectors.base import AnomalyResult, capabilities_of


def merge_specs(specs: Sequence[dict[str, Any]], interpolates: bool, default_interp: str = "bicubic") -> dict[str, Any]:
    """Union of pass specs. The V-V path must branch at one block; position interpolation must
    agree when the input grid differs from the native one (else the streams differ from block 1)."""
    starts = {s["dpam_start"] for s in specs if s.get("dpam_start") is not None}
    if len(starts) > 1:
        raise ValueError(f"detectors start the V-V path at different blocks {sorted(starts)}: no shared pass")
    modes = {s.get("pos_interp") or default_interp for s in specs}
    if interpolates and len(modes) > 1:
        raise ValueError(f"detectors interpolate position embeddings differently {sorted(modes)} at this input "
                         "size: set the same pos_interp on both for a shared pass")
    return {
        "layers": tuple(sorted({i for s in specs for i in s.get("layers", ())})),
        "vv_layers": tuple(sorted({i for s in specs for i in s.get("vv_layers", ())})),
        "dpam_start": next(iter(starts), None),
        "pos_interp": next(iter(sorted(modes)), None),
    }


@torch.inference_mode()
def score_shared(images: Tensor, detectors: Sequence[Any], batch_size: int = 16) -> list[AnomalyResult]:
    """Score ``images [N,3,H,W]`` with every detector from one backbone forward per image.

    Every detector must declare ``capabilities.shared_pass``. Per-image detectors (AnomalyCLIP)
    score each batch's pass with ``score_pass``; batch-wise detectors (MuSc) collect ``from_pass``
    features and score the whole set once at the end.
    """
    if not detectors:
        return []
    caps = [capabilities_of(d) for d in detectors]
    refused = [d.name for d, c in zip(detectors, caps) if not c.shared_pass]
    if refused:
        raise ValueError(f"detectors {refused} cannot score from a shared CLIP pass (capabilities.shared_pass)")
    bb = detectors[0].backbone
    if any(d.backbone is not bb for d in detectors) or not isinstance(bb, ClipBackbone):
        raise ValueError("a shared pass needs every detector on the same CLIP backbone instance")
    grid = bb.patch_grid(*images.shape[-2:])
    spec = merge_specs([d.pass_spec() for d in detectors], tuple(grid) != tuple(bb.visual.grid_size), bb.pos_interp)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    per_image: dict[int, list[AnomalyResult]] = {}
    sets: dict[int, tuple[dict[str, list[Tensor]], list[Tensor]]] = {}
    for b0 in range(0, images.shape[0], batch_size):
        x = images[b0:b0 + batch_size].to(bb.device)
        with bb.autocast():
            out = bb.run(x, **spec)
        for j, det in enumerate(detectors):
            if caps[j].batchwise:
                feats, glob = det.from_pass(out)
                acc = sets.setdefault(j, ({}, []))
                for k, v in feats.items():
                    acc[0].setdefault(k, []).append(v)
                if glob is not None:
                    acc[1].append(glob)
            else:
                per_image.setdefault(j, []).append(det.score_pass(out, size))
    results = []
    for j, det in enumerate(detectors):
        if j in sets:
            feats, globs = sets[j]
            results.append(det.score_features({k: torch.cat(v) for k, v in feats.items()}, image_size=size,
                                              image_features=torch.cat(globs) if globs else None))
        else:
            results.append(AnomalyResult.cat(per_image[j]))
    return results


__all__ = ["merge_specs", "score_shared"]
