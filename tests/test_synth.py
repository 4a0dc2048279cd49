"""Synthetic defects: exact masks, determinism, MVTec writer accepted by anomalib, diffusion training."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspector.data.mvtec import folder_kwargs, read_mvtec, write_mvtec
from inspector.synth import KINDS, generate_defects, make_defect
from inspector.synth.masks import perlin_mask, perlin_noise, scar_mask


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

    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig

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

    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig, receptive_field

    torch.manual_seed(0)
    gen = DefectGen(DefectGenConfig(), device="cpu")
    rf_large, rf_small = receptive_field(gen.large, 96), receptive_field(gen.small, 96)
    assert rf_large >= 90 > 2 * rf_small, (rf_large, rf_small)
    lo, hi = gen._t_range(True)
    assert hi == 1000 and lo < gen.config.switch_t
    lo, hi = gen._t_range(False)
    assert lo == 0 and hi > gen.config.switch_t
    assert gen._model_at(999, 400) is gen.large and gen._model_at(399, 400) is gen.small


def test_diffusion_masks_exact_and_deterministic(disc_gen):
    gen = disc_gen
    normals = [_flat(200 + i) for i in range(4)]
    start = dict(gen.stats)
    a = gen.make_defects(normals, np.random.default_rng(5))
    b = gen.make_defects(normals, np.random.default_rng(5))
    for (oa, ma), (ob, mb), src in zip(a, b, normals):
        _check_pair(src, oa, ma)
        np.testing.assert_array_equal(oa, ob)
        np.testing.assert_array_equal(ma, mb)
    one = gen.make_defect(normals[0], np.random.default_rng(1))
    _check_pair(normals[0], *one)
    made = gen.stats["diffusion"] - start["diffusion"]
    assert made > 0, gen.stats                       # the diffusion model itself made defects
    assert made + gen.stats["fallback"] - start["fallback"] == 9


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
    from inspector.synth.diffusion.generator import DefectGen

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


def test_unconditional_samples_look_like_the_training_defects(disc_gen):
    """Unconditional samples of the disc model: a mask blob that covers part of the patch, darker
    inside than outside (the training defects are dark discs), reproducible from the seed."""
    x = disc_gen.sample(n=6, seed=0)
    assert tuple(x.shape) == (6, 4, 32, 32)
    np.testing.assert_array_equal(x.numpy(), disc_gen.sample(n=6, seed=0).numpy())
    m = x[:, 3] > 0
    frac = m.float().mean(dim=(1, 2))
    ok = (frac > 0.02) & (frac < 0.7)
    assert int(ok.sum()) >= 3, frac
    lum = x[:, :3].mean(1)
    inside = [float(lum[i][m[i]].mean()) for i in range(6) if ok[i]]
    outside = [float(lum[i][~m[i]].mean()) for i in range(6) if ok[i]]
    assert np.mean(inside) < np.mean(outside) - 0.3, (inside, outside)


# ----------------------------------------------------------------------------- CLI

def test_cli_generate_and_train(tmp_path, images):
    from inspector.cli.main import main

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
    from inspector.synth.diffusion.data import _fit_scale
    from inspector.synth.diffusion.model import DefectGenConfig

    img = np.zeros((256, 256, 3), np.uint8)
    big = np.zeros((256, 256), bool)
    big[50:150, 60:120] = True          # 100 px tall
    small = np.zeros((256, 256), bool)
    small[10:20, 10:20] = True
    cfg = DefectGenConfig(patch=64, image_size=256)
    assert _fit_scale([img] * 3, [big] * 3, cfg) == round(0.6 * 64 / (100 / 256))
    assert _fit_scale([img], [small], cfg) == 256            # never above image_size
    assert _fit_scale([img], [np.ones((256, 256), bool)], cfg) == 64   # never below the patch


# ----------------------------------------------------------------------------- severity

def test_draw_severities_stratified_and_checked():
    from inspector.synth.severity import draw_severities, severity_params

    v = draw_severities(12, np.random.default_rng(0))
    assert sorted(np.floor(v * 12).astype(int).tolist()) == list(range(12))   # one per twelfth
    assert (draw_severities(3, np.random.default_rng(0), 0.4) == 0.4).all()
    with pytest.raises(ValueError):
        draw_severities(2, np.random.default_rng(0), [0.1, 1.5])
    with pytest.raises(ValueError):
        draw_severities(3, np.random.default_rng(0), [0.1, 0.2])
    with pytest.raises(ValueError):
        severity_params(-0.1)
    a, b = severity_params(0.0), severity_params(1.0)
    assert a["area"][1] < b["area"][0] and a["strength"] < b["strength"]


def test_fallback_severity_sets_size_and_contrast(images):
    area, change = {}, {}
    for s in (0.05, 0.5, 0.95):
        pairs = generate_defects(images[:2], 12, rng=1, severity=s)
        assert all(m.any() for _, m in pairs)
        area[s] = np.mean([m.mean() for _, m in pairs])
        # mean absolute change inside the mask, on the brick image only (same source every time)
        brick_pairs = generate_defects(images[:1], 12, rng=2, severity=s)
        change[s] = np.mean([np.abs(o.astype(int) - images[0])[m.astype(bool)].mean() for o, m in brick_pairs])
    assert area[0.05] < area[0.5] < area[0.95], area
    assert change[0.05] < change[0.5] < change[0.95], change


def test_severity_monotone_in_detector_score(lite0, brick_crops):
    """On a fixed product (GraphCore on 4 brick shots), weight-free defects of higher severity get
    higher mean scores: the severity axis is an axis of difficulty for the detector."""
    from inspector.detectors.registry import detector_class

    crops = brick_crops(12, 128, seed=3)
    det = detector_class("graphcore")(lite0).fit(lite0.preprocess(crops[:4]))
    means = []
    for s in (0.05, 0.5, 0.95):
        pairs = generate_defects(crops[4:], 12, rng=7, severity=s)
        means.append(float(det.score(lite0.preprocess([p[0] for p in pairs])).scores.mean()))
    normal = float(det.score(lite0.preprocess(crops[4:])).scores.mean())
    assert normal < means[0] < means[1] < means[2], (normal, means)


def test_severity_bands_and_markdown():
    from inspector.synth.severity import severity_bands, severity_markdown

    sev = [0.1, 0.2, 0.5, 0.9, 0.95]
    scores = [1.0, 3.0, 2.0, 5.0, 6.0]
    bands = severity_bands(sev, scores, ok_below=2.5, ng_above=5.5)
    assert [b["n"] for b in bands] == [2, 1, 2]
    assert bands[0]["passed_ok"] == 0.5 and bands[1]["passed_ok"] == 1.0 and bands[2]["passed_ok"] == 0.0
    assert bands[2]["not_ng"] == 0.5
    md = severity_markdown({"defect_severity": sev, "defect_scores": scores}, 2.5, 5.5)
    assert "| faint (severity 0.00-0.33) | 2 | 50% | 100% |" in md
    assert severity_markdown({}, 1, 2) == ""


# ----------------------------------------------------------------------------- diffusion: real defects

def _flat(seed: int, size: int = 64) -> np.ndarray:
    """A flat, lightly textured gray product (the disc generator's normal images)."""
    r = np.random.default_rng(seed)
    g = cv2.GaussianBlur(np.clip(150 + r.normal(0, 6, (size, size)), 0, 255), (0, 0), 1.0)
    return np.repeat(g[..., None], 3, 2).astype(np.uint8)


def _disc_defects(n: int = 6):
    rng = np.random.default_rng(0)
    ims, ms = [], []
    for i in range(n):
        img, m = _flat(i).copy(), np.zeros((64, 64), np.uint8)
        cv2.circle(m, (int(rng.integers(20, 44)), int(rng.integers(20, 44))), int(rng.integers(6, 10)), 1, -1)
        img[m > 0] = (img[m > 0] * 0.3).astype(np.uint8)
        ims.append(img)
        ms.append(m)
    return ims, ms


@pytest.fixture(scope="module")
def disc_gen():
    """A tiny generator trained (150 steps, ~10-30 s on one thread) on six dark discs: an easy
    defect it really learns, so its samples pass the mask-vs-change check."""
    import torch

    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ims, ms = _disc_defects()
    gen = DefectGen(DefectGenConfig.tiny(train_steps=150), device="cpu")
    gen.fit(ims, ms, progress=False)
    yield gen
    torch.set_num_threads(threads)


def _raw_ious(gen, n: int = 12) -> list[float]:
    import torch

    from inspector.synth.diffusion.checks import changed_pixels, mask_iou

    p = gen.config.patch
    rng = np.random.default_rng(4)
    crop = _flat(300)[:p, :p]
    known = torch.cat([torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1, -torch.ones(1, p, p)])
    regs = [gen._region(rng) for _ in range(n)]
    x = gen.sample(known[None].repeat(n, 1, 1, 1), torch.from_numpy(np.stack(regs)[:, None].astype(np.float32)), seed=3)
    out = []
    for k in range(n):
        rgb = (x[k, :3].permute(1, 2, 0).numpy() + 1) * 127.5
        r = regs[k] > 0
        out.append(mask_iou((x[k, 3].numpy() > 0) & r, changed_pixels(rgb, crop.astype(np.float32), r)))
    return out


@pytest.mark.slow
def test_trained_generator_makes_diffusion_defects_untrained_does_not(disc_gen):
    """The mask-vs-change check separates a trained model from an untrained one: the trained
    model's mask channel agrees with where it changed the image (median IoU above 0.6, the
    acceptance threshold is 0.55) and most of its samples are accepted as diffusion defects;
    an untrained model's samples (noise over the whole region, mask on part of it) are not."""
    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig

    normals = [_flat(100 + i) for i in range(8)]
    ious = _raw_ious(disc_gen)
    assert np.median(ious) > 0.6, ious
    before = dict(disc_gen.stats)
    out = disc_gen.make_defects(normals, np.random.default_rng(1))
    made = disc_gen.stats["diffusion"] - before["diffusion"]
    assert made > 0 and made >= len(normals) // 2, disc_gen.stats
    # the accepted defects are the learned ones: dark blobs on the gray product
    dark = [float(o[m.astype(bool)].mean()) < float(src.mean()) - 20 for (o, m), src in zip(out, normals)]
    assert sum(dark) >= made // 2, dark

    untrained = DefectGen(DefectGenConfig.tiny(), device="cpu")
    assert np.median(_raw_ious(untrained)) < disc_gen.config.min_mask_iou
    untrained.make_defects(normals, np.random.default_rng(1))
    assert untrained.stats["diffusion"] < made, untrained.stats
    assert untrained.stats["rejected_iou"] + untrained.stats["rejected_empty"] > 0


def test_sample_rejected_when_mask_channel_disagrees_with_change(disc_gen):
    import torch

    gen = disc_gen
    p = gen.config.patch
    crop = _flat(7)[:p, :p]
    known = torch.cat([torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1, -torch.ones(1, p, p)])
    reg = np.zeros((p, p), np.uint8)
    cv2.circle(reg, (p // 2, p // 2), p // 2 - 1, 1, -1)
    dark = np.zeros((p, p), bool)
    dark[6:20, 6:20] = True                       # where the image changes (generated-region sized)
    elsewhere = np.zeros((p, p), bool)
    elsewhere[14:28, 14:28] = True                # where the mask channel says the defect is
    img = known.clone()
    img[:3, torch.from_numpy(dark)] = -0.8
    for mask, accepted in ((dark, True), (elsewhere, False)):
        g = img.clone()
        g[3] = torch.from_numpy(np.where(mask, 1.0, -1.0).astype(np.float32))
        before = gen.stats["rejected_iou"]
        res = gen._compose(crop, g, reg, 0, 0, p, known=known)
        assert (res is not None) == accepted
        assert gen.stats["rejected_iou"] == before + (0 if accepted else 1)


def test_changed_pixels_and_iou_against_brute_force():
    from inspector.synth.diffusion.checks import changed_pixels, mask_iou

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((20, 30)) > 0.6, rng.random((20, 30)) > 0.5
        brute = sum(x and y for x, y in zip(a.ravel(), b.ravel())) / sum(x or y for x, y in zip(a.ravel(), b.ravel()))
        assert mask_iou(a, b) == pytest.approx(brute)
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0
    # a re-drawn texture of the same statistics is not a change; a dark disc is
    base = _flat(1).astype(np.float32)
    redrawn = _flat(2).astype(np.float32)
    region = np.ones((64, 64), bool)
    assert changed_pixels(redrawn, base, region).mean() < 0.05
    disc = np.zeros((64, 64), np.uint8)
    cv2.circle(disc, (32, 32), 10, 1, -1)
    dark = base.copy()
    dark[disc > 0] *= 0.3
    assert mask_iou(changed_pixels(dark, base, region), disc > 0) > 0.7


def test_diffusion_severity_sets_size_and_contrast(disc_gen):
    normals = [_flat(400 + i) for i in range(8)]
    res = {}
    for s in (0.1, 0.9):
        out = disc_gen.make_defects(normals, np.random.default_rng(2), severity=s)
        res[s] = (np.mean([m.mean() for _, m in out]),
                  np.mean([np.abs(o.astype(int) - n)[m.astype(bool)].mean() for (o, m), n in zip(out, normals)]))
    assert res[0.1][0] < res[0.9][0] and res[0.1][1] < res[0.9][1], res


def test_training_resumes_exactly_from_checkpoint(tmp_path, images):
    import torch

    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig

    ims, ms = _disc_defects(3)
    cfg = lambda: DefectGenConfig.tiny(train_steps=10)  # noqa: E731
    ref = DefectGen(cfg(), device="cpu")
    ref.fit(ims, ms, progress=False)

    class Interrupt(Exception):
        pass

    def stop(stage, step, loss):
        if stage == "small" and step == 5:
            raise Interrupt

    ckpt = tmp_path / "ck.pt"
    with pytest.raises(Interrupt):
        DefectGen(cfg(), device="cpu").fit(ims, ms, progress=False, checkpoint=ckpt, checkpoint_every=2,
                                           callback=stop)
    assert ckpt.is_file()
    resumed = DefectGen(cfg(), device="cpu")
    seen = []
    resumed.fit(ims, ms, progress=False, checkpoint=ckpt, checkpoint_every=2,
                callback=lambda stage, step, loss: seen.append((stage, step)))
    assert seen[0] == ("small", 5) and not ckpt.exists()   # large was not retrained
    for name in ("large", "small"):
        a, b = getattr(ref, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert ref.history[name] == resumed.history[name]
    # a checkpoint of another config is ignored (training starts over)
    torch.save({"key": "other"}, ckpt)
    seen.clear()
    DefectGen(cfg(), device="cpu").fit(ims, ms, progress=False, checkpoint=ckpt,
                                       callback=lambda stage, step, loss: seen.append((stage, step)))
    assert seen[0] == ("large", 1)


def test_estimated_masks_match_the_textile_estimator():
    from inspector.synth.diffusion.checks import mask_iou
    from inspector.synth.estimate import estimate_mask_self
    from inspector.synth.samples import textile_local_defects

    pairs = textile_local_defects(6)
    ious = [mask_iou(estimate_mask_self(img), m) for img, m in pairs]
    assert min(ious) > 0.5, ious
    assert not estimate_mask_self(_flat(3)).any()     # nothing stands out: no mask


def test_cli_train_without_masks_estimates_them(tmp_path, capsys):
    from inspector.cli.main import main
    from inspector.synth.samples import textile_local_defects

    folder = tmp_path / "defects"
    folder.mkdir()
    for i, (img, _) in enumerate(textile_local_defects(5, size=96)):
        cv2.imwrite(str(folder / f"d{i}.png"), img[..., ::-1])
    model = tmp_path / "model"
    assert main(["synth", "train", "--defects", str(folder), "--out", str(model), "--tiny", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "0 with masks, 5 with estimated masks" in out
    import json

    meta = json.loads((model / "defectgen.json").read_text())
    assert meta["training"]["estimated"] == 5 and meta["training"]["seconds"] > 0


# ----------------------------------------------------------------------------- products

def test_product_calibrated_with_generator_records_it(tmp_path, disc_gen, tiny_cnn):
    from inspector.products.registry import ProductRegistry
    from inspector.synth import describe_generator

    path = disc_gen.save(tmp_path / "models" / "discs")
    reg = ProductRegistry(tmp_path / "products")
    shots = [_flat(500 + i) for i in range(3)]
    prod = reg.register("p", shots, detector="patchcore", backbone="tiny-cnn", n_synthetic=6, generator=str(path))
    g = prod.registration["generator"]
    assert g["kind"] == "diffusion" and g["name"] == "discs" and g["path"] == str(path)
    assert g["version"] == disc_gen.version == describe_generator(str(path))["version"]
    cal = prod.calibration
    assert len(cal["defect_severity"]) == len(cal["defect_scores"]) == 6
    assert sum(b["n"] for b in cal["severity_bands"]) == 6
    plain = reg.register("q", shots, detector="patchcore", backbone="tiny-cnn", n_synthetic=6)
    assert plain.registration["generator"]["kind"] == "fallback"
    assert plain.calibration["normal_scores"] == cal["normal_scores"]   # normals independent of the generator
    assert plain.calibration["defect_scores"] != cal["defect_scores"]
    # a retrained model is a new version
    disc_gen.large.conv_in.bias.data += 0.01
    try:
        assert disc_gen.version != g["version"]
    finally:
        disc_gen.large.conv_in.bias.data -= 0.01


def test_registration_passes_generator_to_a_fit_that_takes_one(tmp_path, tiny_cnn, images):
    """A detector whose ``fit`` accepts ``generator`` receives the registration's generator (and
    trains on its defects); one whose ``fit`` does not is fitted as before."""
    from inspector.detectors.registry import detector_class
    from inspector.products.registry import _fit

    base = detector_class("patchcore")
    seen = []

    class Learns(base):
        def fit(self, images, *, generator=None):
            seen.append(generator)
            pairs = generate_defects([images[0].permute(1, 2, 0).mul(40).add(128).clamp(0, 255).byte().numpy()],
                                     2, 0, generator)
            assert all(m.any() for _, m in pairs)
            return super().fit(images)

    x = tiny_cnn.preprocess([images[0], images[0]])
    _fit(Learns(tiny_cnn), x, "scar")
    _fit(Learns(tiny_cnn), x, None)
    assert seen == ["scar", None]
    assert _fit(base(tiny_cnn), x, "scar").memory is not None


def test_cli_register_rejects_missing_generator(tmp_path):
    from inspector.cli.main import main

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _flat(1))
    assert main(["register", "p", str(img), "--generator", str(tmp_path / "nope"), "--backbone", "tiny-cnn",
                 "--data-dir", str(tmp_path / "d")]) == 2
