"""What makes a diffusion training run resumable and reproducible.

The run's identity (config, step count and training data hashed together), the atomic checkpoint
write and its guarded load, and the warmup + cosine learning-rate schedule. ``DefectGen.fit`` (in
:mod:`inspector.synth.diffusion.generator`) drives the loop and calls these; they are kept out of
the generator so the resume contract (an interrupted run ends exactly as an uninterrupted one)
is in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from inspector.synth.diffusion.model import DefectGenConfig


def _fit_key(cfg: DefectGenConfig, steps: int, images, masks) -> str:
    """Identity of a training run: config, step count and the training data."""
    import hashlib

    h = hashlib.sha256(json.dumps({**cfg.to_dict(), "steps": steps}, sort_keys=True).encode())
    for i, m in zip(images, masks):
        h.update(np.ascontiguousarray(i).tobytes())
        h.update(np.packbits(np.asarray(m, bool)).tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, key: str, stage: str, step: int, gen, opt, lr_sched,
                     rng: np.random.Generator, g: torch.Generator, history: dict) -> None:
    """Atomic write (tmp + rename) of everything needed to resume exactly; ``gen`` is the
    :class:`~inspector.synth.diffusion.generator.DefectGen` being trained."""
    state = {"key": key, "stage": stage, "step": step,
             "models": {"large": gen.large.state_dict(), "small": gen.small.state_dict()},
             "opt": opt.state_dict(), "lr": lr_sched.state_dict(),
             "np_rng": json.dumps(rng.bit_generator.state), "torch_rng": g.get_state(), "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, key: str, device) -> dict | None:
    """The checkpoint's state when it belongs to this run (same config and data), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)  # tensors and plain data only
    except Exception:  # noqa: BLE001 - a torn or foreign file: start over
        return None
    return state if state.get("key") == key else None


def _warmup_cosine(steps: int):
    warm = max(1, min(50, steps // 10))

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        # a plain float: numpy scalars in the optimiser state would not load with weights_only=True
        return float(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, (i - warm) / max(1, steps - warm)))))

    return f
