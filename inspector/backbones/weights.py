"""Weights in, exactly: read CLIP release files without executing them, convert once to safetensors.

Why: the OpenAI CLIP release files (``ViT-L-14-336px.pt``...) are TorchScript archives, which
``torch.load(weights_only=True)`` refuses and ``torch.jit.load`` would *execute* (TorchScript code
inside a downloaded file). And OpenAI CLIP was trained with QuickGELU: open_clip's plain
``ViT-L-14-336`` config builds ``nn.GELU``, which silently changes every feature. So:

* :func:`read_weights` reads a TorchScript archive's ``data.pkl`` with a restricted unpickler
  (only tensor rebuilding and placeholder objects for the ``__torch__`` module classes; any
  other global is refused) and rebuilds the tensors from the archive's storages. Parameter and
  buffer names come from the ``__parameters__`` / ``__buffers__`` lists of the archive's class
  definitions, read with ``ast`` (parsed, never executed). open_clip / OpenAI state-dict files
  load with ``torch.load(weights_only=True)``, ``.safetensors`` with safetensors; Hugging Face
  ``transformers`` CLIPModel layouts are mapped to the OpenAI/open_clip names.
* :func:`import_clip` checks every key and shape against the architecture (built on the meta
  device), writes ``models/clip/<arch>.safetensors`` (tensors exactly as in the source file) and
  records its sha256, the source file's sha256 and the activation in ``models/manifest.json``.
* :func:`load_clip_model` is the only production loader: safetensors only, sha256 checked
  against the manifest, OpenAI weights built with QuickGELU.

Every failure is one :class:`WeightsError` naming the file and what was expected (architecture,
key count, sha256); the CLI maps it to exit code 3.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from inspector.backbones.base import MissingWeightsError
from inspector.backbones.configs import CLIP_FILE
from inspector.state import file_sha256

# Architectures whose only public weights are OpenAI's (trained with QuickGELU).
OPENAI_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
# Tensors of the OpenAI archives that are not model weights.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Non-persistent open_clip buffers a TorchScript archive may carry.
NON_PERSISTENT = ("attn_mask",)


class WeightsError(MissingWeightsError):
    """A weights file is present but is not what was expected (wrong model, truncated, tampered).

    A subclass of :class:`MissingWeightsError` on purpose: in both cases usable weights are
    missing, and the CLI answers both with exit code 3.
    """


# ---------------------------------------------------------------------------------------------
# TorchScript archives, read without executing anything
# ---------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a ``__torch__.*`` TorchScript class: keeps only its attribute dict."""

    def __init__(self, qualname: str):
        self.qualname = qualname
        self.state: dict = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"__state__": state}


def _script_class(qualname: str):
    def make(*args):
        return _ScriptObject(qualname)

    # NEWOBJ calls cls.__new__(cls, *args): give pickle a class whose __new__ builds the placeholder.
    return type("ScriptClass", (), {"__new__": staticmethod(lambda cls, *a: make(*a))})


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *_):
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(data))
        self.zf, self.root = zf, root
        self.storages: dict[str, Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks, *a: data
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                      "build_tensorlist", "build_complexlist"):
            return lambda data: data  # typed TorchScript lists: plain data
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, type_str: value
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in ("float32", "float16", "bfloat16", "int64"):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in a weights archive")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        dtype = stype.dtype if isinstance(stype, _StorageType) else stype
        if key not in self.storages:
            raw = self.zf.read(f"{self.root}/data/{key}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes, expected {numel * itemsize}")
            self.storages[key] = torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype) if numel else \
                torch.empty(0, dtype=dtype)
        return self.storages[key]


def _class_slots(zf: zipfile.ZipFile, root: str) -> dict[str, tuple[list[str], list[str]]]:
    """``{qualified class name: (parameters, buffers)}`` from the archive's code files (parsed only)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    prefix = f"{root}/code/"
    for name in zf.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix):-3].replace("/", ".")
        try:
            tree = ast.parse(zf.read(name).decode("utf-8", "replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            slots = {"__parameters__": [], "__buffers__": []}
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                        and stmt.targets[0].id in slots:
                    slots[stmt.targets[0].id] = list(ast.literal_eval(stmt.value))
            out[f"{module}.{node.name}"] = (slots["__parameters__"], slots["__buffers__"])
    return out


def read_torchscript(path: str | Path) -> dict[str, Tensor]:
    """State dict (parameters + buffers) of a TorchScript archive, without running its code."""
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise ValueError("no data.pkl at the archive root: not a TorchScript archive")
        root = pkls[0].split("/")[0]
        slots = _class_slots(zf, root)
        obj = _RestrictedUnpickler(zf.read(pkls[0]), zf, root).load()
    if not isinstance(obj, _ScriptObject):
        raise ValueError("data.pkl does not hold a TorchScript module")
    sd: dict[str, Tensor] = {}

    def walk(o: _ScriptObject, prefix: str) -> None:
        params, buffers = slots.get(o.qualname, (None, None))
        for k, v in o.state.items():
            if isinstance(v, _ScriptObject):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, Tensor) and (params is None or k in params or k in buffers):
                sd[f"{prefix}{k}"] = v

    walk(obj, "")
    return sd


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in zf.namelist())


# ---------------------------------------------------------------------------------------------
# any supported file -> OpenAI/open_clip state dict
# ---------------------------------------------------------------------------------------------


def _from_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``transformers`` CLIPModel names -> OpenAI/open_clip names."""
    out: dict[str, Tensor] = {}
    for tower, pre, dst in (("vision_model", "visual.", "visual.transformer"), ("text_model", "", "transformer")):
        layer = re.compile(rf"^{tower}\.encoder\.layers\.(\d+)\.(.+)$")
        qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
        for k, v in sd.items():
            m = layer.match(k)
            if not m:
                continue
            i, rest = int(m.group(1)), m.group(2)
            b = f"{dst}.resblocks.{i}."
            mq = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
            if mq:
                qkv.setdefault((i, mq.group(2)), {})[mq.group(1)] = v
                continue
            rename = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                      "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
            for a, bb in rename.items():
                if rest.startswith(a):
                    out[b + bb + rest[len(a):]] = v
                    break
        for (i, kind), parts in qkv.items():
            out[f"{dst}.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        del pre
    simple = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for a, b in simple.items():
        if a in sd:
            out[b] = sd[a]
    if "visual_projection.weight" in sd:
        out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    return out


def normalise_state_dict(sd: dict) -> dict[str, Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``module.`` prefixes, map HF transformers names, drop extras."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("vision_model.") for k in sd):
        sd = _from_transformers(sd)
    return {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS + NON_PERSISTENT}


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """``(state dict, format)`` of a CLIP weights file; format is torchscript | safetensors | state_dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return normalise_state_dict(load_file(str(path))), "safetensors"
    if _is_torchscript(path):
        return normalise_state_dict(read_torchscript(path)), "torchscript"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, found {type(obj).__name__}")
    return normalise_state_dict(obj), "state_dict"


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipArch:
    """An open_clip CLIP config plus the activation its weights were trained with."""

    name: str
    config: dict
    quick_gelu: bool

    def build(self, device: str | torch.device = "cpu"):
        from open_clip.model import CLIP

        cfg = {k: v for k, v in self.config.items() if k != "quick_gelu"}
        with torch.device(device):
            return CLIP(**cfg, quick_gelu=self.quick_gelu)

    def expected(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of the state dict this architecture loads (built on the meta device)."""
        model = self.build("meta")
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in NON_PERSISTENT}


# Tiny test architecture (random weights are made by the tests, never shipped): the same
# open_clip CLIP code path as ViT-L, 4 visual blocks of width 48, 8x8 patches at 64 px.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 48, "layers": 4, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4},
}


def clip_arch(name: str, quick_gelu: bool | None = None) -> ClipArch:
    """Architecture ``name`` (``ViT-L-14-336``, ``tiny``...). ``quick_gelu`` None: True for the
    OpenAI-only architectures and the tiny test arch, else open_clip's config value."""
    if name == "tiny":
        return ClipArch(name, dict(TINY_CONFIG), True if quick_gelu is None else quick_gelu)
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"unknown CLIP architecture {name!r}")
    if quick_gelu is None:
        quick_gelu = bool(cfg.get("quick_gelu", False)) or name in OPENAI_ARCHS
    return ClipArch(name, dict(cfg), bool(quick_gelu))


def check_state_dict(sd: dict[str, Tensor], arch: ClipArch, path: Path, sha: str) -> None:
    """Raise :class:`WeightsError` unless ``sd`` has exactly the architecture's keys and shapes."""
    want = arch.expected()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {k}: {tuple(sd[k].shape)} != {want[k]})")
        raise WeightsError(
            f"{path}: not CLIP {arch.name} weights: expected {len(want)} tensors, found {len(sd)}; "
            + "; ".join(parts) + f" (file sha256 {sha})")


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------


def manifest_path(models_dir: Path) -> Path:
    return Path(models_dir) / "manifest.json"


def read_manifest(models_dir: Path) -> dict:
    p = manifest_path(models_dir)
    if not p.is_file():
        return {"models": []}
    return json.loads(p.read_text())


def manifest_entry(models_dir: Path, name: str) -> dict | None:
    return next((m for m in read_manifest(models_dir).get("models", []) if m.get("name") == name), None)


def update_manifest(models_dir: Path, entry: dict) -> None:
    from inspector.state import atomic_write_bytes

    data = read_manifest(models_dir)
    models = [m for m in data.get("models", []) if m.get("name") != entry["name"]]
    old = next((m for m in data.get("models", []) if m.get("name") == entry["name"]), {})
    models.append({**{k: v for k, v in old.items() if k in ("source", "licence", "default")}, **entry})
    data["models"] = models
    atomic_write_bytes(manifest_path(models_dir), (json.dumps(data, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# import and load
# ---------------------------------------------------------------------------------------------


def clip_safetensors(models_dir: Path, arch: str) -> Path:
    return Path(models_dir) / CLIP_FILE.format(arch=arch)


def import_clip(src: str | Path, arch: str, models_dir: Path, quick_gelu: bool | None = None) -> dict:
    """Convert ``src`` (TorchScript / state dict / safetensors) to ``models/clip/<arch>.safetensors``.

    Returns the manifest entry written. Raises :class:`WeightsError` for a wrong or broken file.
    """
    from inspector.state import atomic_write_bytes, safetensors_bytes

    src = Path(src)
    if not src.is_file():
        raise MissingWeightsError(f"{src}: no such file")
    a = clip_arch(arch, quick_gelu)
    want = a.expected()
    sha = file_sha256(src)
    try:
        sd, fmt = read_weights(src)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is one clear message
        raise WeightsError(
            f"{src}: cannot read as CLIP {arch} weights ({type(exc).__name__}: {exc}); expected a TorchScript "
            f"archive, a state dict or safetensors with {len(want)} tensors (file sha256 {sha}; truncated download?)"
        ) from exc
    check_state_dict(sd, a, src, sha)
    out = clip_safetensors(models_dir, arch)
    meta = {"arch": arch, "quick_gelu": str(a.quick_gelu), "source_sha256": sha, "source_format": fmt}
    atomic_write_bytes(out, safetensors_bytes(sd, meta))
    entry = {
        "name": f"clip/{arch}", "file": str(out.relative_to(models_dir)) if out.is_relative_to(models_dir) else str(out),
        "sha256": file_sha256(out), "tensors": len(sd), "quick_gelu": a.quick_gelu,
        "imported_from": src.name, "source_sha256": sha, "source_format": fmt,
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    update_manifest(models_dir, entry)
    return entry


def load_clip_model(arch: str, models_dir: Path, *, verify: bool = True):
    """The production CLIP loader: ``models/clip/<arch>.safetensors`` only, sha256 checked.

    Returns the open_clip ``CLIP`` (fp32, eval) built with the activation recorded at import.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = clip_safetensors(models_dir, arch)
    if not path.is_file():
        loose = sorted(p.name for p in (Path(models_dir) / "clip").glob("*") if p.suffix in (".pt", ".pth", ".bin")
                       or (p.suffix == ".safetensors" and p != path)) if (Path(models_dir) / "clip").is_dir() else []
        hint = (f" Found {', '.join(loose)} in {Path(models_dir) / 'clip'}: import it with "
                f"`inspector weights import FILE --as clip/{arch}`." if loose else "")
        raise MissingWeightsError(
            f"CLIP weights for 'clip/{arch}' not found: expected {path}, made by "
            f"`inspector weights import ViT-L-14-336px.pt --as clip/{arch}` from the OpenAI release file "
            f"(see models/README.md).{hint} No random weights are used outside tests.")
    entry = manifest_entry(models_dir, f"clip/{arch}")
    if entry is None or "sha256" not in entry:
        raise WeightsError(f"{path}: no sha256 for clip/{arch} in {manifest_path(models_dir)}; "
                           f"re-import it with `inspector weights import FILE --as clip/{arch}`")
    if verify:
        sha = file_sha256(path)
        if sha != entry["sha256"]:
            raise WeightsError(f"{path}: sha256 {sha} does not match the manifest ({entry['sha256']}); "
                               f"the file changed since it was imported: re-import it")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    quick = meta.get("quick_gelu", str(entry.get("quick_gelu", True))) == "True"
    a = clip_arch(arch, quick)
    sd = load_file(str(path))
    check_state_dict(sd, a, path, entry["sha256"])
    model = a.build("cpu")
    model.load_state_dict(sd, strict=True)
    return model.float().eval()


__all__ = [
    "ClipArch",
    "WeightsError",
    "check_state_dict",
    "clip_arch",
    "import_clip",
    "load_clip_model",
    "read_manifest",
    "read_torchscript",
    "read_weights",
]
