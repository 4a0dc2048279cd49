"""Weights in, exactly: a tiny QuickGELU CLIP in the real file formats (OpenAI TorchScript archive,
state dict, safetensors, Hugging Face transformers names) imports to identical features, a GELU
build of the same weights differs, and wrong / truncated / tampered files stop with one clear
error (exit code 3) naming the file, the architecture, the key count and the sha256.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile

import pytest
import torch

from inspector.backbones.registry import MissingWeightsError
from inspector.backbones.vit import load_clip
from inspector.backbones.weights import (
    WeightsError,
    clip_arch,
    import_clip,
    load_clip_model,
    read_torchscript,
    read_weights,
)


def _openai_like(seed: int = 0) -> torch.nn.Module:
    """Tiny CLIP with the OpenAI release's quirks: QuickGELU, fp16 linear/conv/attention weights,
    and the three metadata tensors the OpenAI archives carry."""
    from open_clip.model import convert_weights_to_lp

    torch.manual_seed(seed)
    model = clip_arch("tiny", quick_gelu=True).build("cpu").eval()
    convert_weights_to_lp(model, torch.float16)
    for k, v in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, k):
            delattr(model, k)  # open_clip keeps these as ints; the OpenAI archives as tensors
        model.register_buffer(k, torch.tensor(v))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clipfiles")
    model = _openai_like()
    ts = d / "tiny-openai.pt"
    torch.jit.script(model).save(str(ts))
    sd_file = d / "tiny-state.pt"
    torch.save(model.state_dict(), sd_file)
    # OpenAI's release files were made with torch.jit.trace (a different code layout from script)
    traced = d / "tiny-traced.pt"
    ex = (torch.randn(1, 3, 64, 64), torch.randint(0, 49408, (1, 77)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the trace is only saved, never run
        torch.jit.trace(clip_arch("tiny").build("cpu").eval(), ex, check_trace=False).save(str(traced))
    return {"model": model, "torchscript": ts, "state_dict": sd_file, "traced": traced, "dir": d}


def _features(model, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        return model.encode_image(x)


@pytest.mark.parametrize("kind", ["torchscript", "traced"])
def test_torchscript_read_without_executing_equals_jit_state_dict(files, kind):
    sd = read_torchscript(files[kind])
    ref = torch.jit.load(str(files[kind])).state_dict()  # reference only, in the test
    assert set(sd) == set(ref)
    assert all(torch.equal(sd[k], ref[k]) and sd[k].dtype == ref[k].dtype for k in ref)
    if kind == "torchscript":
        assert sd["visual.conv1.weight"].dtype == torch.float16 and sd["visual.ln_pre.weight"].dtype == torch.float32


def test_torchscript_reader_refuses_foreign_globals(tmp_path, files):
    """A data.pkl that names any other global (here os.system) is refused, not called."""
    bad = tmp_path / "evil.pt"
    with zipfile.ZipFile(files["torchscript"]) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item.endswith("/data.pkl"):
                data = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03."
            dst.writestr(item, data)
    with pytest.raises(pickle.UnpicklingError, match="refusing global os.system"):
        read_torchscript(bad)


def test_torchscript_and_state_dict_import_to_identical_quickgelu_features(tmp_path, files):
    m1, m2 = tmp_path / "a", tmp_path / "b"
    e1 = import_clip(files["torchscript"], "tiny", m1)
    e2 = import_clip(files["state_dict"], "tiny", m2)
    assert e1["source_format"] == "torchscript" and e2["source_format"] == "state_dict"
    assert e1["quick_gelu"] and e1["tensors"] == e2["tensors"] == len(clip_arch("tiny").expected())
    manifest = json.loads((m1 / "manifest.json").read_text())
    entry = next(m for m in manifest["models"] if m["name"] == "clip/tiny")
    assert entry["sha256"] == e1["sha256"] and len(entry["sha256"]) == 64
    a, b = load_clip_model("tiny", m1), load_clip_model("tiny", m2)
    fa, fb = _features(a), _features(b)
    assert torch.equal(fa, fb)
    # the reference: the original model in fp32 (QuickGELU)
    ref = files["model"].float()
    torch.testing.assert_close(fa, _features(ref), rtol=0, atol=1e-6)
    assert type(a.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    # the same weights in a GELU build (open_clip's plain ViT configs) give different features
    gelu = clip_arch("tiny", quick_gelu=False).build("cpu").eval()
    from safetensors.torch import load_file

    gelu.load_state_dict(load_file(str(m1 / "clip" / "tiny.safetensors")))
    assert (gelu.float().eval().encode_image(torch.zeros(1, 3, 64, 64)) - a.encode_image(torch.zeros(1, 3, 64, 64))
            ).abs().max() > 1e-4
    assert (_features(gelu.float()) - fa).abs().max() > 1e-4


def test_safetensors_and_transformers_layout_import(tmp_path, files):
    from safetensors.torch import save_file

    sd = {k: v for k, v in files["model"].state_dict().items() if k not in ("attn_mask",)}
    st = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    import_clip(st, "tiny", tmp_path / "m1")
    # transformers CLIPModel names (q/k/v split, Linear projections), built from the same weights
    hf = {}
    for tower, src in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(4):
            b = f"{src}.resblocks.{i}."
            q, k, v = sd[b + "attn.in_proj_weight"].chunk(3)
            qb, kb, vb = sd[b + "attn.in_proj_bias"].chunk(3)
            t = f"{tower}.encoder.layers.{i}."
            hf.update({t + "self_attn.q_proj.weight": q, t + "self_attn.k_proj.weight": k,
                       t + "self_attn.v_proj.weight": v, t + "self_attn.q_proj.bias": qb,
                       t + "self_attn.k_proj.bias": kb, t + "self_attn.v_proj.bias": vb})
            for a, bb in (("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."),
                          ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")):
                for p in ("weight", "bias"):
                    hf[t + bb + p] = sd[b + a + p]
    hf.update({
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t(), "text_projection.weight": sd["text_projection"].t(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"], "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "logit_scale": sd["logit_scale"],
    })
    hf_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(hf_file))
    got, fmt = read_weights(hf_file)
    assert fmt == "safetensors" and set(got) == set(clip_arch("tiny").expected())
    import_clip(hf_file, "tiny", tmp_path / "m2")
    assert torch.equal(_features(load_clip_model("tiny", tmp_path / "m1")),
                       _features(load_clip_model("tiny", tmp_path / "m2")))


def test_wrong_truncated_and_tampered_files_give_one_clear_error(tmp_path, files):
    from inspector.cli.main import main

    # wrong architecture: the tiny file is not ViT-B-16
    with pytest.raises(WeightsError) as err:
        import_clip(files["torchscript"], "ViT-B-16", tmp_path)
    msg = str(err.value)
    assert str(files["torchscript"]) in msg and "ViT-B-16" in msg and "expected" in msg and "sha256" in msg
    # truncated download
    cut = tmp_path / "cut.pt"
    cut.write_bytes(files["torchscript"].read_bytes()[:5000])
    assert main(["weights", "import", str(cut), "--as", "clip/tiny", "--models-dir", str(tmp_path / "m")]) == 3
    # the CLI path that works
    good = tmp_path / "ok"
    assert main(["weights", "import", str(files["torchscript"]), "--as", "clip/tiny", "--models-dir", str(good)]) == 0
    assert (good / "clip" / "tiny.safetensors").is_file()
    # a changed file after import: the production loader refuses it
    path = good / "clip" / "tiny.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="does not match the manifest"):
        load_clip_model("tiny", good)


def test_production_loads_only_imported_safetensors(tmp_path, files):
    """A release .pt lying in models/clip is not loaded directly: the error says how to import it."""
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "ViT-L-14-336px.pt").write_bytes(files["torchscript"].read_bytes())
    with pytest.raises(MissingWeightsError) as err:
        load_clip("ViT-L-14-336", tmp_path)
    assert "inspector weights import" in str(err.value) and "ViT-L-14-336.safetensors" in str(err.value)
