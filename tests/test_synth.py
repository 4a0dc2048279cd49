"""Synthetic defects: exact masks, determinism, MVTec writer accepted by anomalib, diffusion training."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspector.synth import KINDS, generate_defects, make_defect
from inspector.synth.masks import perlin_mask, perlin_noise, scar_mask
from inspector.synth.mvtec import folder_kwargs, read_mvtec, write_mvtec


def _check_pair(src: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    assert out.shape == src.shape and out.dtype == np.uint8
    assert mask.shape == src.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert mask.any(), "mask is empty"
    changed = (out != src).any(axis=2)
    np.testing.assert_array_equal(changed, mask.astype(bool))


@pytest.fixture(scope="module")
def images(brick) -> list[np.ndarray]:
    from skimage import data

    small = cv2.resize(brick, (128, 128), interpolation=cv2.INTER_AREA)
    coffee = cv2.resize(data.coffee(), (160, 96), interpolation=cv2.INTER_AREA)
    flat = np.full((64, 64, 3), 255, np.uint8)          # saturated white: pushes must go down
    black = np.zeros((48, 80, 3), np.uint8)
    return [small, coffee, flat, black]


@pytest.mark.parametrize("kind", ("any",) + KINDS)
def test_fallback_masks_are_exact(images, kind):
    for i, img in enumerate(images):
        for seed in range(5):
            out, mask = make_defect(img, np.random.default_rng([seed, i]), kind)
            _check_pair(img, out, mask)
            frac = mask.mean()
            assert 0.001 < frac < 0.2, (kind, i, seed, frac)


@pytest.mark.parametrize("kind", KINDS)
def test_fallback_is_deterministic(images, kind):
    a = make_defect(images[0], np.random.default_rng(7), kind)
    b = make_defect(images[0], np.random.default_rng(7), kind)
    c = make_defect(images[0], np.random.default_rng(8), kind)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_fallback_area_and_visibility(images):
    areas, changes = [], []
    for seed in range(30):
        out, mask = make_defect(images[0], np.random.default_rng(seed))
        areas.append(mask.mean())
        changes.append(np.abs(out.astype(int) - images[0])[mask.astype(bool)].mean())
    assert 0.003 < np.median(areas) < 0.1
    assert max(areas) < 0.15
    assert np.median(changes) > 12


def test_gray_image_gets_gray_defects(images):
    for seed in range(6):
        out, _ = make_defect(images[0], np.random.default_rng(seed))
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_fallback_rejects_bad_input():
    with pytest.raises(ValueError):
        make_defect(np.zeros((32, 32, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_defect(np.zeros((4, 4, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_defect(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0), kind="nope")


def test_mask_samplers():
    rng = np.random.default_rng(0)
    n = perlin_noise((50, 70), (4, 3), rng)
    assert n.shape == (50, 70) and np.isfinite(n).all() and n.std() > 0.05
    for _ in range(10):
        m = perlin_mask((64, 96), rng, (0.02, 0.05))
        assert m.dtype == bool and 0.01 <= m.mean() <= 0.08
        s = scar_mask((64, 96), rng)
        assert s.any() and s.mean() < 0.15
    within = np.zeros((64, 64), bool)
    within[10:30, 20:50] = True
    m = perlin_mask((64, 64), rng, (0.05, 0.1), within=within)
    assert m.any() and not (m & ~within).any()


def test_generate_defects_api(images):
    pairs = generate_defects(images[:2], 6, rng=3)
    assert len(pairs) == 6
    again = generate_defects(images[:2], 6, rng=np.random.default_rng(3))
    for (a, ma), (b, mb) in zip(pairs, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ma, mb)
    scars = generate_defects(images[:1], 2, rng=0, generator="scar")
    for out, mask in scars:
        _check_pair(images[0], out, mask)
    with pytest.raises(ValueError):
        generate_defects([], 1)


def test_mvtec_writer_round_trip_and_anomalib(tmp_path, images):
    import torch
    from anomalib.data import Folder

    rng = np.random.default_rng(0)
    img = images[0]
    defects = {
        "stain": [make_defect(img, rng, "perlin") for _ in range(3)],
        "scratch": [make_defect(img, rng, "scar") for _ in range(3)],
    }
    root = write_mvtec(tmp_path / "prod", [img] * 4, [img] * 3, defects)
    info = read_mvtec(root)
    assert len(info.train_good) == 4 and len(info.test_good) == 3
    assert info.defect_types == ["scratch", "stain"] == info.masked_types
    m = cv2.imread(str(root / "ground_truth" / "stain" / "000_mask.png"), cv2.IMREAD_UNCHANGED)
    assert m.ndim == 2 and set(np.unique(m).tolist()) <= {0, 255}
    np.testing.assert_array_equal(m > 0, defects["stain"][0][1].astype(bool))
    back = cv2.cvtColor(cv2.imread(str(root / "test" / "stain" / "000.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, defects["stain"][0][0])

    dm = Folder(**folder_kwargs(root), train_batch_size=2, eval_batch_size=4, num_workers=0,
                val_split_mode="none")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.image.shape[0] == 2 and batch.image.shape[1] == 3
    labels, masks = [], []
    for b in dm.test_dataloader():
        labels.append(b.gt_label)
        masks.append(b.gt_mask)
    labels = torch.cat(labels)
    assert int(labels.sum()) == 6 and len(labels) == 9
    masks = torch.cat(masks)
    assert masks[labels.bool()].flatten(1).any(1).all()
    assert not masks[~labels.bool()].any()


# ----------------------------------------------------------------------------- diffusion (tiny)

@pytest.fixture(scope="module")
def tiny_gen(images):
    """A tiny two-stage generator trained for a few seconds on fallback defects of brick."""
    import torch

    from inspector.synth.diffusion import DefectGen, DefectGenConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and contention on CI)
    rng = np.random.default_rng(0)
    pairs = [make_defect(images[0], rng, "perlin") for _ in range(4)]
    ims, ms = [p[0] for p in pairs], [p[1] for p in pairs]
    gen = DefectGen(DefectGenConfig.tiny(train_steps=20), device="cpu")
    before = gen.eval_loss(ims, ms)
    gen.fit(ims, ms, progress=False)
    after = gen.eval_loss(ims, ms)
    yield gen, before, after
    torch.set_num_threads(threads)


def test_diffusion_training_lowers_loss(tiny_gen):
    gen, before, after = tiny_gen
    assert set(gen.history) == {"large", "small"} and len(gen.history["large"]) == 20
    for name in ("large", "small"):
        assert after[name] < before[name], (name, before, after)


def test_diffusion_two_stage_receptive_fields():
    import torch

    from inspector.synth.diffusion import DefectGen, DefectGenConfig, receptive_field

    torch.manual_seed(0)
    gen = DefectGen(DefectGenConfig(), device="cpu")
    rf_large, rf_small = receptive_field(gen.large, 96), receptive_field(gen.small, 96)
    assert rf_large >= 90 > 2 * rf_small, (rf_large, rf_small)
    lo, hi = gen._t_range(True)
    assert hi == 1000 and lo < gen.config.switch_t
    lo, hi = gen._t_range(False)
    assert lo == 0 and hi > gen.config.switch_t
    assert gen._model_at(999, 400) is gen.large and gen._model_at(399, 400) is gen.small


def test_diffusion_masks_exact_and_deterministic(tiny_gen, images):
    gen, _, _ = tiny_gen
    normals = [images[0], images[1]]
    start = gen.stats["diffusion"] + gen.stats["fallback"]
    a = gen.make_defects(normals, np.random.default_rng(5))
    b = gen.make_defects(normals, np.random.default_rng(5))
    for (oa, ma), (ob, mb), src in zip(a, b, normals):
        _check_pair(src, oa, ma)
        np.testing.assert_array_equal(oa, ob)
        np.testing.assert_array_equal(ma, mb)
    one = gen.make_defect(images[0], np.random.default_rng(1))
    _check_pair(images[0], *one)
    assert gen.stats["diffusion"] + gen.stats["fallback"] - start == 5


def test_diffusion_falls_back_when_mask_empty(tiny_gen, images):
    gen, _, _ = tiny_gen
    old = gen.config.min_pixels, gen.config.retries
    gen.config.min_pixels, gen.config.retries = 10**9, 0   # nothing is ever big enough
    try:
        before = gen.stats["fallback"]
        out, mask = gen.make_defect(images[0], np.random.default_rng(0))
        _check_pair(images[0], out, mask)
        assert gen.stats["fallback"] == before + 1
    finally:
        gen.config.min_pixels, gen.config.retries = old


def test_diffusion_save_load_round_trip(tiny_gen, images, tmp_path):
    from inspector.synth.diffusion import DefectGen

    gen, _, _ = tiny_gen
    path = gen.save(tmp_path / "model")
    assert (path / "large" / "diffusion_pytorch_model.safetensors").is_file()
    assert (path / "small" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DefectGen.load(path, device="cpu")
    assert loaded.config == gen.config
    a = gen.make_defects([images[0]], np.random.default_rng(9))[0]
    b = loaded.make_defects([images[0]], np.random.default_rng(9))[0]
    np.testing.assert_array_equal(a[0], b[0])
    pairs = generate_defects([images[0]], 2, rng=0, generator=str(path))
    for out, mask in pairs:
        _check_pair(images[0], out, mask)


def test_unconditional_sample_shape(tiny_gen):
    gen, _, _ = tiny_gen
    x = gen.sample(n=2, seed=0)
    assert tuple(x.shape) == (2, 4, 32, 32) and float(x.abs().max()) <= 1.0


# ----------------------------------------------------------------------------- CLI

def test_cli_generate_and_train(tmp_path, images):
    from inspector.cli import main

    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(4):
        cv2.imwrite(str(normal / f"n{i}.png"), images[0][..., ::-1])
    out = tmp_path / "gen"
    assert main(["synth", "generate", "--normal", str(normal), "--n", "5", "--out", str(out),
                 "--fallback", "--seed", "3", "--type", "stain"]) == 0
    info = read_mvtec(out)
    assert len(info.defects["stain"]) == 5 and info.masked_types == ["stain"]
    assert len(info.train_good) == 3 and len(info.test_good) == 1
    assert main(["synth", "generate", "--normal", str(normal), "--n", "2", "--out", str(out)]) == 2  # exists

    write_mvtec(tmp_path / "defects", [], [], {"stain": [make_defect(images[0], np.random.default_rng(i))
                                                         for i in range(3)]})
    model = tmp_path / "model"
    assert main(["synth", "train", "--defects", str(tmp_path / "defects"), "--out", str(model),
                 "--tiny", "--steps", "3"]) == 0
    assert (model / "defectgen.json").is_file()
    out2 = tmp_path / "gen2"
    assert main(["synth", "generate", "--normal", str(normal), "--n", "2", "--out", str(out2),
                 "--model", str(model)]) == 0
    assert len(read_mvtec(out2).defects["synthetic"]) == 2


def test_mvtec_writer_accepted_by_anomalib_mvtecad(tmp_path, images):
    import torch
    from anomalib.data import MVTecAD

    rng = np.random.default_rng(1)
    defects = {"scratch": [make_defect(images[0], rng, "scar") for _ in range(4)]}
    write_mvtec(tmp_path / "part", [images[0]] * 3, [images[0]] * 2, defects)
    dm = MVTecAD(root=tmp_path, category="part", train_batch_size=3, eval_batch_size=8, num_workers=0,
                 val_split_mode="none")
    dm.setup()
    assert next(iter(dm.train_dataloader())).image.shape[0] == 3
    batch = next(iter(dm.test_dataloader()))
    labels = batch.gt_label.bool()
    assert int(labels.sum()) == 4 and len(labels) == 6
    assert batch.gt_mask[labels].flatten(1).any(1).all() and not batch.gt_mask[~labels].any()
    assert isinstance(batch.image, torch.Tensor)


def test_diffusion_working_scale_fits_defects_in_a_patch():
    from inspector.synth.diffusion import DefectGenConfig, _fit_scale

    img = np.zeros((256, 256, 3), np.uint8)
    big = np.zeros((256, 256), bool)
    big[50:150, 60:120] = True          # 100 px tall
    small = np.zeros((256, 256), bool)
    small[10:20, 10:20] = True
    cfg = DefectGenConfig(patch=64, image_size=256)
    assert _fit_scale([img] * 3, [big] * 3, cfg) == round(0.6 * 64 / (100 / 256))
    assert _fit_scale([img], [small], cfg) == 256            # never above image_size
    assert _fit_scale([img], [np.ones((256, 256), bool)], cfg) == 64   # never below the patch
