"""The shared patch backbone: real weights are really loaded, every family returns
``{layer: [B,h,w,C]}`` on one grid, and missing weights stop with one clear error."""

from __future__ import annotations

import pytest
import torch

from inspector.backbones.configs import BACKBONES
from inspector.backbones.efficientnet import load_lite0_classifier
from inspector.backbones.registry import MissingWeightsError, describe, load_backbone


def test_lite0_real_weights_classify_coffee_as_espresso():
    from skimage import data

    from inspector.backbones.base import LITE_MEAN, LITE_STD, Preprocess

    model = load_lite0_classifier()
    x = Preprocess(224, LITE_MEAN, LITE_STD)(data.coffee())
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 967  # ImageNet 'espresso'
    assert float(probs[967]) > 0.5


def test_lite0_strict_loading_rejects_wrong_state(tmp_path):
    from inspector.backbones.efficientnet import lite0_weights_path

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    state.pop("_conv_stem.weight")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="_conv_stem.weight"):
        load_lite0_classifier(bad)


def test_lite0_patch_features(lite0):
    x = torch.randn(2, 3, 128, 128)
    feats = lite0.embed(x)
    assert list(feats) == list(lite0.layers) == ["blocks.4", "blocks.7", "blocks.10"]
    h, w = lite0.patch_grid(128, 128)
    assert (h, w) == (16, 16)
    for name, f in feats.items():
        assert f.shape == (2, h, w, lite0.dims[name]) and f.dtype == torch.float32
        assert torch.isfinite(f).all()
    assert not lite0.is_random
    # one image alone gives the same features as inside a batch (eval-mode BN, no batch coupling)
    single = lite0.embed(x[:1])
    for name in feats:
        torch.testing.assert_close(single[name][0], feats[name][0], atol=1e-5, rtol=1e-4)


def test_lite0_non_square_input(lite0):
    feats = lite0.embed(torch.randn(1, 3, 96, 160))
    assert all(f.shape[1:3] == (12, 20) for f in feats.values())


def test_preprocess_resizes_and_normalises(lite0, brick):
    x = lite0.preprocess([brick, brick[:300, :200]])
    assert x.shape == (2, 3, 128, 128) and x.dtype == torch.float32
    assert -1.1 < float(x.min()) and float(x.max()) < 1.1  # TF-Lite scaling (x-127)/128


@pytest.mark.parametrize("name, size, grid", [("clip/tiny", 64, 8), ("dinov2/tiny", 56, 4), ("tiny-cnn", 64, 8)])
def test_tiny_configs_share_the_contract(name, size, grid):
    bb = load_backbone(name, device="cpu")
    assert bb.is_random, "tiny configs must be marked as random"
    feats = bb.embed(torch.randn(3, 3, size, size))
    assert bb.patch_grid(size, size) == (grid, grid)
    assert len(feats) == len(bb.layers) >= 2
    for layer, f in feats.items():
        assert f.shape == (3, grid, grid, bb.dims[layer])


def test_clip_tiny_exposes_text_encoder():
    bb = load_backbone("clip/tiny", device="cpu")
    tokens = bb.tokenize(["a photo of a flawless object", "a photo of a damaged object"])
    with torch.inference_mode():
        text = bb.encode_text(tokens)
        image = bb.encode_image(torch.randn(1, 3, 64, 64))
    assert text.shape == (2, bb.embed_dim) and image.shape == (1, bb.embed_dim)


@pytest.mark.parametrize("name, expected", [("clip/ViT-L-14-336", "ViT-L-14-336px.pt"),
                                            ("clip/ViT-B-16", "ViT-B-16.pt"),
                                            ("dinov2/small", "dinov2_vits14.safetensors")])
def test_missing_weights_error_names_the_file(tmp_path, monkeypatch, name, expected):
    monkeypatch.setenv("INSPECTOR_MODELS", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        load_backbone(name, device="cpu")
    msg = str(err.value)
    assert expected in msg and str(tmp_path) in msg and "models/README.md" in msg
    info = describe(name)
    assert not info.weights_present and expected in info.weights


def test_unknown_backbone():
    with pytest.raises(KeyError, match="unknown backbone"):
        load_backbone("resnet-9000", device="cpu")


def test_backbones_cli_lists_and_runs(capsys):
    from inspector.cli.main import main

    assert main(["backbones", "--all", "--run"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0" in out and "blocks.10" in out and "NO" in out
    assert "(1, 32, 32, 112)" in out  # the coffee photo through the default backbone at 256 px


@pytest.mark.parametrize("name", [n for n, c in BACKBONES.items() if c.family != "EfficientNetLiteBackbone"
                                  and not c.test_only])
def test_config_rows_match_the_architecture(name):
    """Each weighted row says what the family builds: the layers (the family's evenly spaced default),
    stride, native input size and normalisation. Built on the meta device: no weights needed."""
    from inspector.backbones.vit import ClipBackbone, Dinov2Backbone
    from inspector.backbones.weights import clip_arch

    cfg = BACKBONES[name]
    if cfg.family == "ClipBackbone":
        bb = ClipBackbone(clip_arch(cfg.arch).build("meta"), name=name)
    else:
        import timm

        with torch.device("meta"):
            model = timm.create_model(cfg.arch, pretrained=False, img_size=cfg.image_size, dynamic_img_size=True)
        bb = Dinov2Backbone(model, name=name, image_size=cfg.image_size)
    assert (bb.layers, bb.stride, bb.preprocess.size) == (cfg.layers, cfg.stride, cfg.image_size)
    assert (bb.preprocess.mean, bb.preprocess.std) == (cfg.mean, cfg.std)
    assert type(bb).__name__ == cfg.family


@pytest.mark.parametrize("name", [n for n, c in BACKBONES.items() if c.family == "EfficientNetLiteBackbone"
                                  or c.test_only])
def test_config_rows_match_the_built_backbone(name):
    cfg = BACKBONES[name]
    bb = load_backbone(name, device="cpu")
    assert (bb.layers, bb.stride, bb.preprocess.size) == (cfg.layers, cfg.stride, cfg.image_size)
    assert (bb.preprocess.mean, bb.preprocess.std) == (cfg.mean, cfg.std)
    assert type(bb).__name__ == cfg.family and bb.is_random == cfg.test_only


def test_lite0_row_names_the_wheel_file_and_its_sha256():
    from inspector.backbones.efficientnet import lite0_weights_path
    from inspector.state import file_sha256

    cfg = BACKBONES["efficientnet-lite0"]
    path = lite0_weights_path()
    assert path.as_posix().endswith(cfg.weights.removeprefix("package:"))
    assert file_sha256(path) == cfg.sha256
