"""AnomalyCLIP prompt checkpoints: safetensors + JSON beside it, never pickle.

``NAME.safetensors`` holds the :class:`~inspector.detectors.anomalyclip.torch_model.PromptLearner`
tensors, ``NAME.json`` the :class:`~inspector.detectors.anomalyclip.torch_model.AnomalyCLIPConfig`
that rebuilds the detector; ``NAME.train.safetensors/.json`` the optimizer state that lets training
resume. :func:`import_official_checkpoint` converts the official ``epoch_N.pth`` (read with
``weights_only=True``) into that format with the official preset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from inspector.backbones.registry import MissingWeightsError, models_dir
from inspector.detectors.anomalyclip.torch_model import (
    DEFAULT_BACKBONE,
    FORMAT,
    OFFICIAL_IMAGE_SIZE,
    T_N_CTX,
    AnomalyCLIPConfig,
    official_dpam_start,
)


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_name(p.name[: -len(".safetensors")] + ".json")


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Atomically write ``NAME.safetensors`` and ``NAME.json``; returns the safetensors path."""
    from inspector.state import atomic_write_bytes, atomic_write_json, safetensors_bytes

    st, js = _paths(path)
    atomic_write_bytes(st, safetensors_bytes(tensors, {"format": FORMAT}))
    atomic_write_json(js, config)
    return st


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    st, js = _paths(path)
    if not st.is_file():
        raise MissingWeightsError(f"AnomalyCLIP prompt checkpoint {st} not found")
    if not js.is_file():
        raise FileNotFoundError(f"{js} (the checkpoint's config) is missing beside {st}")
    return load_file(str(st)), json.loads(js.read_text())


def _checkpoint_path(name_or_path: str | os.PathLike) -> Path:
    """A path, or a name under ``models/anomalyclip/`` (``NAME`` -> ``models/anomalyclip/NAME.safetensors``)."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.is_file() or p.with_name(p.name + ".safetensors").is_file():
        return p
    return models_dir() / "anomalyclip" / f"{p.name}.safetensors"


def map_official_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official ``prompt_learner`` state dict -> this module's :class:`PromptLearner` tensors.

    ``ctx_pos [1,1,n_ctx,D]`` -> ``ctx_normal``, ``ctx_neg`` -> ``ctx_abnormal``,
    ``compound_prompts_text.{i} [t_n_ctx,D]`` -> ``deep.{i}``. The projections
    (``compound_prompt_projections.*``, unused by the official forward) and the token buffers
    (rebuilt from the tokenizer) are dropped.
    """
    missing = [k for k in ("ctx_pos", "ctx_neg") if k not in sd]
    if missing:
        raise ValueError(f"not an official AnomalyCLIP prompt_learner: missing {missing}")
    out = {}
    for src, dst in (("ctx_pos", "ctx_normal"), ("ctx_neg", "ctx_abnormal")):
        t = sd[src]
        if t.ndim != 4 or t.shape[:2] != (1, 1):
            raise ValueError(f"{src}: shape {tuple(t.shape)}, expected [1, 1, n_ctx, D] (one class, one state)")
        out[dst] = t[0, 0].float().contiguous()
    i = 0
    while f"compound_prompts_text.{i}" in sd:
        out[f"deep.{i}"] = sd[f"compound_prompts_text.{i}"].float().contiguous()
        i += 1
    unknown = [k for k in sd if not (k in ("ctx_pos", "ctx_neg") or k.startswith("compound_prompts_text.")
                                     or k.startswith("compound_prompt_projections.") or k.startswith("token_"))]
    if unknown:
        raise ValueError(f"unexpected keys in the official checkpoint: {unknown[:5]}")
    return out


def import_official_checkpoint(src: str | os.PathLike, name: str, models_root: Path | None = None, *,
                               backbone: str = DEFAULT_BACKBONE) -> Path:
    """Official ``epoch_N.pth`` (``{"prompt_learner": ...}``) -> ``models/anomalyclip/NAME.safetensors``
    + ``.json`` with the official preset; sha256s recorded in ``models/manifest.json``.

    Read with ``torch.load(weights_only=True)``; shapes checked against ``backbone``'s text width
    (from the architecture config: the CLIP weights are not needed here).
    """
    from inspector.backbones.weights import TINY_CONFIG, WeightsError, clip_arch, update_manifest
    from inspector.state import file_sha256

    src = Path(src)
    root = Path(models_root) if models_root is not None else models_dir()
    if not src.is_file():
        raise MissingWeightsError(f"{src}: no such file")
    sha = file_sha256(src)
    arch = backbone.split("/", 1)[-1]
    cfg = TINY_CONFIG if arch == "tiny" else clip_arch(arch).config
    dim, text_layers = cfg["text_cfg"]["width"], cfg["text_cfg"]["layers"]
    vis_layers = cfg["vision_cfg"]["layers"]
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
        sd = obj.get("prompt_learner", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"expected a dict with 'prompt_learner', found {type(obj).__name__}")
        tensors = map_official_keys(sd)
    except Exception as exc:  # noqa: BLE001 - one clear message for any unreadable file
        raise WeightsError(
            f"{src}: not an official AnomalyCLIP checkpoint for {backbone} ({type(exc).__name__}: {exc}); expected "
            f"{{'prompt_learner': {{ctx_pos [1,1,12,{dim}], ctx_neg, compound_prompts_text.0..7 [4,{dim}], ...}}}} "
            f"(file sha256 {sha})") from exc
    n_ctx, d = tensors["ctx_normal"].shape
    deep = [tensors[f"deep.{i}"] for i in range(len(tensors) - 2)]
    t_n_ctx = int(deep[0].shape[0]) if deep else T_N_CTX
    bad = [k for k, v in tensors.items() if v.shape[-1] != dim] + \
          [f"deep.{i}" for i, t in enumerate(deep) if tuple(t.shape) != (t_n_ctx, dim)]
    if bad or tensors["ctx_abnormal"].shape != (n_ctx, d) or len(deep) + 1 > text_layers:
        raise WeightsError(
            f"{src}: prompt shapes do not fit {backbone} (text width {dim}, {text_layers} text blocks): "
            f"ctx {tuple(tensors['ctx_normal'].shape)}, {len(deep)} deep tokens, mismatched {bad[:3]} (file sha256 {sha})")
    config = AnomalyCLIPConfig(
        backbone=backbone, n_ctx=int(n_ctx), depth=len(deep) + 1, t_n_ctx=t_n_ctx, feature_layers=(vis_layers - 1,),
        dpam_start=official_dpam_start(vis_layers), map_weight=0.0, pos_interp="bilinear", global_ln_post=False,
        blur_padding="symmetric",
        image_size=OFFICIAL_IMAGE_SIZE if backbone == DEFAULT_BACKBONE else None, preset="official",
        training={"source": "official zqhang/AnomalyCLIP checkpoint", "file": src.name, "sha256": sha},
    )
    out = write_checkpoint(root / "anomalyclip" / f"{name}.safetensors", tensors, config.to_json())
    entry = {"name": f"anomalyclip/{name}", "file": str(out.relative_to(root)), "sha256": file_sha256(out),
             "backbone": backbone, "imported_from": src.name, "source_sha256": sha, "preset": "official"}
    update_manifest(root, entry)
    return out


def _train_state_paths(path: str | os.PathLike) -> Path:
    st, _ = _paths(path)
    return st.with_name(st.name[: -len(".safetensors")] + ".train.safetensors")


def save_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> Path:
    """Optimizer state (tensors -> safetensors, the rest -> JSON) and progress beside the prompts."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    config = {"format": FORMAT + "-train", "param_groups": sd["param_groups"], "scalars": scalars, **info}
    return write_checkpoint(_train_state_paths(path), tensors, config)


def load_train_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(optimizer_state_dict, info)`` or None when no training state sits beside ``path``."""
    p = _train_state_paths(path)
    if not p.is_file():
        return None
    tensors, config = read_checkpoint(p)
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for idx, kv in config.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    info = {k: v for k, v in config.items() if k not in ("param_groups", "scalars", "format")}
    return {"state": state, "param_groups": config["param_groups"]}, info


__all__ = ["import_official_checkpoint", "load_train_state", "map_official_keys", "read_checkpoint",
           "save_train_state", "write_checkpoint"]
