"""AnomalyCLIP on the tiny random open_clip config (``clip/tiny``: 64 px, 8x8 patches, 4 blocks).

What is checked: the frozen encoders are reproduced exactly (text encoder vs ``encode_text``,
global embedding vs ``encode_image``, DPAM-off patch tokens vs the backbone's own features),
DPAM changes only the patch path, only prompt parameters train, the loss goes down on a tiny
generated set, checkpoints round-trip, batch splits do not change results, shapes and ranges
hold at several input sizes, and the `inspector train anomalyclip` CLI trains, resumes
(bit-identically to an uninterrupted run) and fails cleanly without real CLIP weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.backbones.registry import MissingWeightsError, load_backbone
from inspector.detectors.anomalyclip.checkpoint import load_train_state, read_checkpoint
from inspector.detectors.anomalyclip.detector import AnomalyCLIP
from inspector.detectors.anomalyclip.torch_model import dice_loss, encode_text_deep, focal_loss, run_visual
from inspector.detectors.anomalyclip.train import scan_mvtec, train_prompts
from inspector.detectors.base import AnomalyResult
from inspector.detectors.registry import detector_class


@pytest.fixture(scope="module")
def bb():
    return load_backbone("clip/tiny", device="cpu")


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g)


# -- a tiny generated defect set: brick crops + the weight-free generator (exact masks) -----------


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    from skimage import data

    brick = data.brick()
    y, x = rng.integers(0, brick.shape[0] - 2 * size, 2)
    crop = brick[y:y + 2 * size:2, x:x + 2 * size:2].astype(np.float32)
    return np.repeat(crop[..., None], 3, axis=2).astype(np.uint8)


def make_mvtec(root: Path, *, seed: int = 0, size: int = 64, n_train: int = 4, n_good: int = 2, n_bad: int = 6,
               masks: bool = True) -> Path:
    from inspector.data.mvtec import write_mvtec
    from inspector.synth.fallback import make_defect

    rng = np.random.default_rng(seed)
    train = [_texture(rng, size) for _ in range(n_train)]
    good = [_texture(rng, size) for _ in range(n_good)]
    bad = [make_defect(_texture(rng, size), rng, "any", area=(0.03, 0.12)) for _ in range(n_bad)]
    return write_mvtec(root, train, good, {"defect": [(im, m if masks else None) for im, m in bad]})


def _batch(root: Path, size: int = 64):
    from inspector.detectors.anomalyclip.train import MaskedImages

    ds = MaskedImages(scan_mvtec(root), size)
    items = [ds[i] for i in range(len(ds))]
    return tuple(torch.stack([it[k] for it in items]) for k in range(4))


# -- exact reproduction of the frozen encoders ----------------------------------------------------


def test_text_encoder_reproduces_encode_text(bb):
    model = bb.model
    tokens = bb.tokenize(["a photo of a cat.", "a photo of a damaged object.", "object"])
    embeds = model.token_embedding(tokens)
    with torch.no_grad():
        ours = encode_text_deep(model, embeds, tokens, deep=())
        ref = model.encode_text(tokens)
    assert torch.equal(ours, ref)


def test_deep_tokens_replace_positions_in_the_first_layers(bb):
    """Brute-force reference: one prompt at a time, explicit per-layer replacement."""
    model = bb.model
    det = AnomalyCLIP(bb)
    embeds, tokens, deep = det.prompts()
    assert det.config.depth == 3 and len(deep) == 2  # 9 of 12 text blocks scaled to 4 blocks
    with torch.no_grad():
        ours = encode_text_deep(model, embeds, tokens, deep)
        # the prompts are cut after the EOT (causal mask): reference on the full 77 tokens
        full = bb.tokenize(["X " * 12 + "object.", "X " * 12 + "damaged object."])
        assert tokens.shape[1] < full.shape[1] and torch.equal(full[:, :tokens.shape[1]], tokens)
        full_embeds = model.token_embedding(full)
        full_embeds[:, 1:13] = torch.stack([det.prompts.ctx_normal, det.prompts.ctx_abnormal])
        for j in range(2):
            x = full_embeds[j:j + 1] + model.positional_embedding
            for i, blk in enumerate(model.transformer.resblocks):
                if i in (1, 2):
                    x = x.clone()
                    x[0, 1:1 + det.config.t_n_ctx] = deep[i - 1]
                x = blk(x, attn_mask=model.attn_mask)
            x = model.ln_final(x)[0, int(full[j].argmax())] @ model.text_projection
            torch.testing.assert_close(ours[j], x, rtol=1e-5, atol=1e-5)
        # the deep tokens matter
        assert not torch.allclose(ours, encode_text_deep(model, embeds, tokens, ()))


def test_dpam_changes_patch_tokens_not_global_embedding(bb, images):
    det = AnomalyCLIP(bb, preset="project")
    plain = AnomalyCLIP(bb, preset="project", dpam_start=None)
    assert det.config.dpam_start == det.config.feature_layers[0] == 0
    with torch.no_grad():
        out, out0 = run_visual(bb, det.config, images), run_visual(bb, plain.config, images)
        ref = bb.model.encode_image(images)
        feats = bb(images)
    assert torch.equal(out.global_embedding, ref)
    assert torch.equal(out0.global_embedding, ref)
    v = bb.model.visual
    for name, p_dpam, p_plain in zip(bb.layers, out.patch_tokens, out0.patch_tokens):
        # DPAM off: exactly the backbone's own block outputs through ln_post + proj
        with torch.no_grad():
            expect = v.ln_post(feats[name].flatten(1, 2)) @ v.proj
        torch.testing.assert_close(p_plain, expect, rtol=0, atol=1e-6)
        assert (p_dpam - p_plain).abs().max() > 1e-2
    # the shared backbone is untouched: still a plain nn.MultiheadAttention everywhere
    assert all(type(b.attn) is torch.nn.MultiheadAttention for b in v.transformer.resblocks)


# -- training -------------------------------------------------------------------------------------


def test_only_prompt_parameters_train(bb, tmp_path):
    root = make_mvtec(tmp_path / "d", n_train=1, n_good=1, n_bad=2)
    x, masks, has_mask, labels = _batch(root)
    det = AnomalyCLIP(bb)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in det.prompts.state_dict().items()}
    opt = torch.optim.Adam(det.parameters(), lr=1e-2)
    total, map_loss, image_loss = det.loss(x, masks, has_mask, labels)
    assert map_loss > 0 and image_loss > 0
    total.backward()
    names = [n for n, _ in det.prompts.named_parameters()]
    assert names == ["ctx_normal", "ctx_abnormal", "deep.0", "deep.1"]
    for n, p in det.prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    assert all(not torch.equal(prompt_before[k], v) for k, v in det.prompts.state_dict().items())


def test_loss_functions_match_official_definitions():
    prob1 = torch.tensor([[0.9, 0.2], [0.3, 0.6]])[None]
    prob = torch.stack([1 - prob1, prob1], 1)
    gt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None]
    # focal: pt = p(true class) + 1e-5 with the one-hot clamped to [1e-5, 1-1e-5]
    oh1 = gt.clamp(1e-5, 1 - 1e-5)
    pt = (oh1 * prob1 + (1 - oh1) * (1 - prob1)) + 1e-5
    torch.testing.assert_close(focal_loss(prob, gt), (-(1 - pt) ** 2 * pt.log()).mean())
    d = 1 - (2 * (prob1 * gt).sum() + 1) / (prob1.sum() + gt.sum() + 1)
    torch.testing.assert_close(dice_loss(prob1, gt), d)


def test_loss_decreases_on_generated_defects(bb, tmp_path):
    root = make_mvtec(tmp_path / "d", n_train=1, n_good=1, n_bad=4)
    x, masks, has_mask, labels = _batch(root)
    det = AnomalyCLIP(bb, seed=3)
    feats = det.image_features(x)  # frozen: computed once
    opt = torch.optim.Adam(det.parameters(), lr=1e-2, betas=(0.5, 0.999))
    losses = []
    for _ in range(8):
        total, _, _ = det.loss(x, masks, has_mask, labels, features=feats)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_image_level_only_without_masks(bb, tmp_path):
    root = make_mvtec(tmp_path / "d", n_train=1, n_good=1, n_bad=2, masks=False)
    samples = scan_mvtec(root)
    assert not any(s.has_mask for s in samples) and sum(s.label for s in samples) == 2
    x, masks, has_mask, labels = _batch(root)
    _, map_loss, image_loss = AnomalyCLIP(bb).loss(x, masks, has_mask, labels)
    assert float(map_loss) == 0.0 and float(image_loss) > 0


def test_a_bmp_mask_trains_as_a_mask_and_eval_reads_it_too(bb, tmp_path):
    """The training scanner and evaluation read one layout rule: a ``.bmp`` mask is a mask for
    both (the map loss uses it), and its defect pixels are the same ones."""
    import cv2

    from inspector.data.mvtec import read_mask, read_mvtec

    root = make_mvtec(tmp_path / "d", n_train=1, n_good=1, n_bad=2)
    png = root / "ground_truth" / "defect" / "000_mask.png"
    bmp = png.with_suffix(".bmp")
    assert cv2.imwrite(str(bmp), cv2.imread(str(png), cv2.IMREAD_UNCHANGED))
    expect = read_mask(png)
    png.unlink()
    samples = scan_mvtec(root)
    bad = {s.path.name: s for s in samples if s.label == 1}
    assert bad["000.png"].mask == bmp and bad["000.png"].has_mask and expect.any()
    assert read_mvtec(root).masks["defect"][0] == bmp and "defect" in read_mvtec(root).masked_types
    x, masks, has_mask, labels = _batch(root)
    i = next(k for k, s in enumerate(samples) if s.mask == bmp)
    assert expect.shape == (64, 64) and torch.equal(masks[i].bool(), torch.from_numpy(expect))
    _, map_loss, _ = AnomalyCLIP(bb).loss(x, masks, has_mask, labels)
    assert bool(has_mask[i]) and float(map_loss) > 0


# -- inference contract ---------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_maps(bb, tmp_path, images):
    det = AnomalyCLIP(bb, seed=5)
    with torch.no_grad():
        for p in det.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = det.save(tmp_path / "prompts.safetensors")
    assert path.is_file() and path.with_suffix(".json").is_file()
    tensors, config = read_checkpoint(path)
    assert set(tensors) == {"ctx_normal", "ctx_abnormal", "deep.0", "deep.1"}  # prompts only
    assert config["backbone"] == "clip/tiny" and config["n_ctx"] == 12 and config["t_n_ctx"] == 4
    loaded = AnomalyCLIP.load(path, backbone=bb)
    a, b = det.score(images), loaded.score(images)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    # and by backbone name (the registry hands out the same shared instance)
    c = AnomalyCLIP.load(path, device="cpu").score(images)
    assert torch.equal(a.maps, c.maps)
    d = AnomalyCLIP(bb, checkpoint=path, n_ctx=4).score(images)  # the checkpoint's structure wins
    assert torch.equal(a.maps, d.maps)
    # the detector protocol's state round trip (what the product registry stores)
    e = AnomalyCLIP.from_state(bb, *det.state()).score(images)
    assert torch.equal(a.scores, e.scores)
    assert detector_class("anomalyclip") is AnomalyCLIP


def test_batch_split_does_not_change_results(bb, images):
    det = AnomalyCLIP(bb, seed=1)
    whole = det.score(images)
    single = AnomalyResult.cat([det.score(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(whole.maps, single.maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.scores, single.scores, rtol=0, atol=1e-6)
    det.chunk = 3  # internal chunking gives the same too
    torch.testing.assert_close(det.score(images).maps, whole.maps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(64, 64), (96, 96), (80, 48), (40, 40)])
def test_shapes_and_ranges_at_any_size(bb, hw):
    det = AnomalyCLIP(bb)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    r = det.score(x)
    assert r.maps.shape == (2, *hw) and r.scores.shape == (2,)
    assert r.maps.dtype == torch.float32 and torch.isfinite(r.maps).all()
    assert 0.0 <= float(r.maps.min()) and float(r.maps.max()) <= 1.0
    assert 0.0 <= float(r.scores.min()) and float(r.scores.max()) <= 1.0
    assert det.fit(x) is det and not AnomalyCLIP.needs_fit and not AnomalyCLIP.batchwise


def test_missing_clip_weights_raise_clear_error(bb, tmp_path, monkeypatch, capsys):
    from inspector.cli.main import main
    from inspector.errors import EXIT_WEIGHTS

    monkeypatch.setenv("INSPECTOR_MODELS", str(tmp_path / "empty_models"))
    det = AnomalyCLIP(bb)
    tensors, config = det.state()
    config["backbone"] = "clip/ViT-L-14-336"
    from inspector.detectors.anomalyclip.checkpoint import write_checkpoint

    path = write_checkpoint(tmp_path / "vitl.safetensors", tensors, config)
    with pytest.raises(MissingWeightsError, match="ViT-L-14-336px.pt"):
        AnomalyCLIP.load(path, device="cpu")
    with pytest.raises(MissingWeightsError, match="inspector train anomalyclip"):
        AnomalyCLIP.from_pretrained("nothing-here", backbone=bb)
    data = make_mvtec(tmp_path / "d", n_train=1, n_good=1, n_bad=1)
    code = main(["train", "anomalyclip", "--data", str(data), "--backbone", "clip/ViT-L-14-336",
                 "--out", str(tmp_path / "x.safetensors")])
    assert code == EXIT_WEIGHTS
    err = capsys.readouterr().err
    assert "ViT-L-14-336px.pt" in err and "models/README.md" in err


# -- CLI: train end to end, resume ----------------------------------------------------------------


def test_cli_train_and_resume(tmp_path, capsys):
    from inspector.cli.main import main

    data = make_mvtec(tmp_path / "gen", n_train=1, n_good=1, n_bad=4)
    common = ["train", "anomalyclip", "--data", str(data), "--backbone", "clip/tiny", "--batch-size", "3",
              "--lr", "0.01", "--quiet", "--device", "cpu"]
    full = tmp_path / "models" / "full.safetensors"
    part = tmp_path / "models" / "part.safetensors"
    assert main(common + ["--out", str(full), "--epochs", "3"]) == 0
    assert main(common + ["--out", str(part), "--epochs", "1"]) == 0
    opt_state, info = load_train_state(part)
    assert info["epoch"] == 1 and len(info["history"]) == 1 and opt_state["state"]
    assert main(common + ["--out", str(part), "--epochs", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming part.safetensors after epoch 1" in out
    a, ca = read_checkpoint(full)
    b, cb = read_checkpoint(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume == uninterrupted
    assert ca["training"]["epochs"] == cb["training"]["epochs"] == 3
    hist = load_train_state(part)[1]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and hist[-1]["loss"] < hist[0]["loss"]
    # the trained prompts load as a detector (backbone by name from the checkpoint)
    det = AnomalyCLIP.load(full, device="cpu")
    # official preset: the test split only (1 good + 4 defects; the train/good image is not used)
    assert det.config.training["samples"] == 5 and det.config.image_size == 64
    # nothing to do when already trained that far
    assert main(common + ["--out", str(part), "--epochs", "3", "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_train_prompts_api_without_cache_matches_cached(bb, tmp_path):
    data = make_mvtec(tmp_path / "d", n_train=1, n_good=0, n_bad=2)
    r1 = train_prompts(data, tmp_path / "a.safetensors", backbone=bb, epochs=1, batch_size=3, lr=1e-2,
                       progress=False, log=None, cache_features=True)
    r2 = train_prompts(data, tmp_path / "b.safetensors", backbone=bb, epochs=1, batch_size=3, lr=1e-2,
                       progress=False, log=None, cache_features=False)
    a, _ = read_checkpoint(r1.path)
    b, _ = read_checkpoint(r2.path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cli_defaults_match_the_detector_without_importing_torch_at_parse_time():
    from inspector.cli.commands import train
    from inspector.detectors.anomalyclip import torch_model as anomalyclip

    assert (train.DEFAULT_BACKBONE, train.N_CTX, train.T_N_CTX) == (
        anomalyclip.DEFAULT_BACKBONE, anomalyclip.N_CTX, anomalyclip.T_N_CTX)


# -- official preset against an independent port of zqhang/AnomalyCLIP's test path ---------------


@pytest.fixture(scope="module")
def bb24():
    """A 24-block tiny CLIP, so the official DPAM_layer=20 (last 19 blocks) and layer 24 apply as in ViT-L."""
    import open_clip
    from open_clip.model import CLIP

    from inspector.backbones.vit import ClipBackbone

    torch.manual_seed(11)
    model = CLIP(embed_dim=32, quick_gelu=True,
                 vision_cfg={"image_size": 64, "patch_size": 8, "width": 32, "layers": 24, "head_width": 16},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4})
    return ClipBackbone(model, name="clip/tiny24", is_random=True, tokenizer=open_clip.get_tokenizer("ViT-B-16"))


def _official_visual(visual, x, out_layers=(24,), dpam_layer=20):
    """zqhang/AnomalyCLIP VisionTransformer.forward after DAPM_replace(DPAM_layer), written out:
    bilinear position interpolation, dual path (V-V attention without FFN on the new path),
    global = x_ori[CLS] @ proj (no ln_post), patches = ln_post(path) @ proj."""
    import torch.nn.functional as F

    t = visual.conv1(x)
    b, c = t.shape[:2]
    t = t.reshape(b, c, -1).permute(0, 2, 1)
    t = torch.cat([visual.class_embedding + torch.zeros(b, 1, c), t], dim=1)
    pos = visual.positional_embedding
    side, new_side = int((pos.shape[0] - 1) ** 0.5), int((t.shape[1] - 1) ** 0.5)
    if side != new_side:
        g = pos[1:].reshape(-1, side, side, c).permute(0, 3, 1, 2)
        g = F.interpolate(g, (new_side, new_side), mode="bilinear")
        pos = torch.cat([pos[:1], g.reshape(-1, c, new_side * new_side).transpose(1, 2)[0]], 0)
    t = visual.ln_pre(t + pos)
    blocks = visual.transformer.resblocks
    n_blocks = len(blocks)
    replaced = {n_blocks - i for i in range(1, dpam_layer)}  # resblocks[-i], 0-based indices

    def attn_pair(blk, a):
        heads = blk.attn.num_heads
        qkv = F.linear(a, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        qkv = qkv.reshape(b, a.shape[1], 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = (c // heads) ** -0.5
        ori = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
        vv = ((v @ v.transpose(-2, -1)) * scale).softmax(-1) @ v
        proj = lambda o: F.linear(o.transpose(1, 2).reshape(b, -1, c), blk.attn.out_proj.weight,  # noqa: E731
                                  blk.attn.out_proj.bias)
        return proj(vv), proj(ori)

    path, ori, tokens = t, None, []
    for idx, blk in enumerate(blocks):
        if idx in replaced:
            src = path if ori is None else ori
            vv_res, ori_res = attn_pair(blk, blk.ln_1(src))
            ori = src + ori_res
            ori = ori + blk.mlp(blk.ln_2(ori))
            path = path + vv_res
        else:
            path = path + blk.attn(blk.ln_1(path), blk.ln_1(path), blk.ln_1(path), need_weights=False)[0]
            path = path + blk.mlp(blk.ln_2(path))
        if idx + 1 in out_layers:
            tokens.append(path)
    final = ori if ori is not None else path
    return final[:, 0] @ visual.proj, [visual.ln_post(p) @ visual.proj for p in tokens]


def test_official_preset_matches_official_test_path(bb24):
    """Image size 80 (patch grid 10x10, native 8x8): interpolation, upsampling and the scores."""
    from scipy.ndimage import gaussian_filter

    det = AnomalyCLIP(bb24, seed=2)  # preset "official" is the default
    cfg = det.config
    assert cfg.feature_layers == (23,) and cfg.dpam_start == 5 and cfg.map_weight == 0
    assert cfg.pos_interp == "bilinear" and not cfg.global_ln_post and cfg.train_splits == ("test",)
    x = torch.randn(3, 3, 80, 80, generator=torch.Generator().manual_seed(4))
    res = det.score(x)
    with torch.no_grad():
        text = det.text_features()  # [2, E], normal first (checked against encode_text above)
        g, patches = _official_visual(bb24.model.visual, x)
        g = g / g.norm(dim=-1, keepdim=True)
        p_img = (g @ text.t() / 0.07).softmax(-1)[:, 1]
        maps = []
        for p in patches:
            p = p / p.norm(dim=-1, keepdim=True)
            sim = (p @ text.t() / 0.07).softmax(-1)[:, 1:, :]  # drop the CLS row
            side = int(sim.shape[1] ** 0.5)
            sim = torch.nn.functional.interpolate(sim.reshape(3, side, side, 2).permute(0, 3, 1, 2), (80, 80),
                                                  mode="bilinear").permute(0, 2, 3, 1)
            maps.append((sim[..., 1] + 1 - sim[..., 0]) / 2.0)
        amap = torch.stack(maps).sum(0)
        amap = np.stack([gaussian_filter(m, sigma=4) for m in amap.numpy()])
    torch.testing.assert_close(res.scores, p_img.float(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.maps.numpy(), amap, rtol=1e-4, atol=1e-5)


def test_project_preset_differs_from_official(bb24):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    off = AnomalyCLIP(bb24, seed=2).score(x)
    proj = AnomalyCLIP(bb24, seed=2, preset="project")
    assert len(proj.config.feature_layers) == 4 and proj.config.map_weight == 0.5 and proj.config.global_ln_post
    assert not torch.allclose(off.scores, proj.score(x).scores)


def test_register_without_prompts_stops_with_a_clear_error(tmp_path, bb24):
    """A production CLIP without a prompt checkpoint: no silent random prompts."""
    bb24.is_random = False
    try:
        with pytest.raises(MissingWeightsError, match="needs trained prompts.*inspector weights import"):
            AnomalyCLIP(bb24)
    finally:
        bb24.is_random = True


def test_official_checkpoint_imports_and_scores(tmp_path, bb, images):
    """A tiny checkpoint in the official key layout ({'prompt_learner': ...}, ctx_pos [1,1,n,D],
    compound_prompts_text.{i}, projections and token buffers) imports, with the official preset."""
    from inspector.cli.main import main
    from inspector.detectors.anomalyclip.checkpoint import import_official_checkpoint

    g = torch.Generator().manual_seed(0)
    dim = bb.model.ln_final.weight.shape[0]
    sd = {"ctx_pos": torch.randn(1, 1, 12, dim, generator=g).half(), "ctx_neg": torch.randn(1, 1, 12, dim, generator=g).half()}
    for i in range(2):  # depth 3 of the 4-block tiny text tower
        sd[f"compound_prompts_text.{i}"] = torch.randn(4, dim, generator=g)
        sd[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, dim, generator=g)
        sd[f"compound_prompt_projections.{i}.bias"] = torch.randn(896, generator=g)
    for k in ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg"):
        sd[k] = torch.randn(1, 1, 3, dim, generator=g)
    src = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": sd}, src)
    mdir = tmp_path / "models"
    assert main(["weights", "import", str(src), "--as", "anomalyclip/visa", "--backbone", "clip/tiny",
                 "--models-dir", str(mdir)]) == 0
    tensors, cfg = read_checkpoint(mdir / "anomalyclip" / "visa.safetensors")
    assert set(tensors) == {"ctx_normal", "ctx_abnormal", "deep.0", "deep.1"}
    assert torch.equal(tensors["ctx_normal"], sd["ctx_pos"][0, 0].float())
    assert torch.equal(tensors["ctx_abnormal"], sd["ctx_neg"][0, 0].float())
    assert torch.equal(tensors["deep.1"], sd["compound_prompts_text.1"])
    assert cfg["preset"] == "official" and cfg["feature_layers"] == [3] and cfg["depth"] == 3
    det = AnomalyCLIP(bb, checkpoint=mdir / "anomalyclip" / "visa.safetensors")
    res = det.score(images)
    assert res.maps.shape == (4, 64, 64) and ((res.scores >= 0) & (res.scores <= 1)).all()
    assert torch.equal(det.prompts.ctx_normal.detach(), tensors["ctx_normal"])
    # a checkpoint for another CLIP (text width 768) does not fit clip/tiny: exit code 3
    big = {"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 12, 768), "ctx_neg": torch.zeros(1, 1, 12, 768)}}
    torch.save(big, tmp_path / "big.pth")
    assert main(["weights", "import", str(tmp_path / "big.pth"), "--as", "anomalyclip/x", "--backbone", "clip/tiny",
                 "--models-dir", str(mdir)]) == 3
    # not an AnomalyCLIP file at all (and nothing executed: weights_only)
    torch.save({"model": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(MissingWeightsError, match="not an official AnomalyCLIP checkpoint"):
        import_official_checkpoint(tmp_path / "other.pth", "y", mdir, backbone="clip/tiny")


def test_default_image_size_follows_the_official_setting(tmp_path, bb):
    assert AnomalyCLIP.default_image_size("clip/ViT-L-14-336", {}) == 518
    assert AnomalyCLIP.default_image_size("clip/ViT-L-14-336", {"preset": "project"}) is None
    assert AnomalyCLIP.default_image_size("clip/ViT-B-16", {}) is None
    path = AnomalyCLIP(bb, image_size=96).save(tmp_path / "p.safetensors")
    assert AnomalyCLIP.default_image_size("clip/tiny", {"checkpoint": str(path)}) == 96
