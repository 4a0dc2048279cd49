"""Sample products: layout, determinism, caching, build time."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from inspector.data.mvtec import folder_kwargs, read_mvtec
from inspector.synth.samples import PRODUCTS, build_sample


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    out, secs = {}, {}
    for name in ("brick", "textile"):
        t0 = time.perf_counter()
        out[name] = build_sample(name, root=root)
        secs[name] = time.perf_counter() - t0
    print(f"\nsample build seconds: {secs}")
    return root, out, secs


def _check_masks(info):
    for t in info.masked_types:
        for img_p, m_p in zip(info.defects[t], info.masks[t]):
            m = cv2.imread(str(m_p), cv2.IMREAD_UNCHANGED)
            img = cv2.imread(str(img_p))
            assert m.shape == img.shape[:2]
            assert set(np.unique(m).tolist()) <= {0, 255} and (m > 0).any()


def test_brick_layout(built):
    _, out, secs = built
    info = read_mvtec(out["brick"])
    assert len(info.train_good) == 16 and len(info.test_good) == 12
    assert info.defect_types == ["misplaced", "scratch", "stain"] == info.masked_types
    assert sum(len(v) for v in info.defects.values()) == 12
    img = cv2.imread(str(info.train_good[0]))
    assert img.shape == (256, 256, 3)
    _check_masks(info)
    assert secs["brick"] < 60


def test_textile_layout(built):
    _, out, secs = built
    info = read_mvtec(out["textile"])
    assert len(info.train_good) == 16 and len(info.test_good) == 12
    assert info.defect_types == ["global", "local", "synthetic"]
    assert info.masked_types == ["synthetic"]
    assert len(info.defects["local"]) == len(info.defects["global"]) == 12
    assert all(m is None for m in info.masks["local"])
    _check_masks(info)
    manifest = json.loads((out["textile"] / "manifest.json").read_text())
    assert manifest["recipe"]["product"] == "textile" and "sources" in manifest
    assert secs["textile"] < 60


def test_cached_and_deterministic(built, tmp_path):
    root, out, _ = built
    t0 = time.perf_counter()
    assert build_sample("brick", root=root) == out["brick"]
    assert time.perf_counter() - t0 < 0.5
    other = build_sample("brick", root=tmp_path)
    a, b = read_mvtec(out["brick"]), read_mvtec(other)
    for pa, pb in zip(a.test_items(), b.test_items()):
        assert pa[0].read_bytes() == pb[0].read_bytes()
        if pa[2] is not None:
            assert pa[2].read_bytes() == pb[2].read_bytes()
    seeded = build_sample("brick", root=tmp_path, seed=1, size=64)
    assert seeded.name == "brick-s1-64"
    assert cv2.imread(str(read_mvtec(seeded).train_good[0])).shape == (64, 64, 3)
    assert (read_mvtec(seeded).train_good[0].read_bytes() != a.train_good[0].read_bytes())


def test_stale_manifest_rebuilds(tmp_path):
    p = build_sample("gravel", root=tmp_path, size=64)
    m = json.loads((p / "manifest.json").read_text())
    m["recipe"]["version"] = -1
    (p / "manifest.json").write_text(json.dumps(m))
    (p / "train" / "good" / "000.png").unlink()
    p2 = build_sample("gravel", root=tmp_path, size=64)
    assert p2 == p and (p / "train" / "good" / "000.png").is_file()


def test_unknown_product(tmp_path):
    with pytest.raises(ValueError):
        build_sample("nope", root=tmp_path)
    assert set(PRODUCTS) >= {"brick", "textile"}


def test_textile_classification_folder(built):
    from anomalib.data import Folder

    _, out, _ = built
    kw = folder_kwargs(out["textile"], masked_only=False)
    assert kw["abnormal_dir"] == ["test/global", "test/local", "test/synthetic"] and "mask_dir" not in kw
    dm = Folder(**kw, train_batch_size=4, eval_batch_size=8, num_workers=0, val_split_mode="none")
    dm.setup()
    n_abn = int(sum(int(b.gt_label.sum()) for b in dm.test_dataloader()))
    assert n_abn == 32


def test_textile_local_defects_have_estimated_masks(built):
    from inspector.synth.samples import estimate_local_mask, textile_local_defects

    _, out, _ = built
    pairs = textile_local_defects(6, size=256)
    used = set(json.loads((out["textile"] / "manifest.json").read_text())["sources"]["test/local"])
    assert len(pairs) == 6
    for img, m in pairs:
        assert img.shape == (256, 256, 3) and m.shape == (256, 256) and m.dtype == bool
        assert 40 <= m.sum() <= 0.02 * m.size  # one small blob, not the weave
        # the blob is where the high-frequency noise is: more residual energy inside than outside
        g = img.mean(axis=2).astype(np.float32)
        res = np.abs(g - cv2.medianBlur(g.astype(np.uint8), 5))
        assert res[m].mean() > 1.5 * res[~m].mean()
    again = textile_local_defects(6, size=256)
    assert all((a[1] == b[1]).all() for a, b in zip(pairs, again))
    # a nominal image gives a small or empty mask (there is nothing to find)
    from inspector.data.mvtec import read_mvtec
    from inspector.io import read_image

    nominal = read_image(read_mvtec(out["textile"]).train_good[0])
    assert estimate_local_mask(nominal).sum() < 400
    assert used  # the product's local files are listed (and disjoint by construction)


# ---------------------------------------------------------------- one MVTec layout, one mask rule


def _layout_with_mask(root, suffix: str, values=(0, 255)):
    """One class: 2 train/good, 1 test/good, 1 test/dent with its mask saved as ``suffix``."""
    from inspector.io import write_image

    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    for rel in ("train/good/000.png", "train/good/001.png", "test/good/000.png", "test/dent/000.png"):
        write_image(root / rel, img())
    m = np.full((32, 32), values[0], np.uint8)
    m[8:16, 8:20] = values[1]
    (root / "ground_truth" / "dent").mkdir(parents=True)
    assert cv2.imwrite(str(root / "ground_truth" / "dent" / f"000_mask{suffix}"), m)
    return m != values[0]


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_any_image_suffix_is_a_mask_for_the_reader_and_eval(tmp_path, suffix):
    from inspector.backbones.base import Preprocess
    from inspector.eval.data import find_classes, load_test_set

    want = _layout_with_mask(tmp_path / "part", suffix)
    info = read_mvtec(tmp_path / "part")
    assert info.masked_types == ["dent"] and info.masks["dent"][0].suffix == suffix
    [c] = find_classes(tmp_path)  # eval's loader: the same listing, the type counts as masked
    assert c.masked_types == ["dent"] and c.unmasked_types == [] and c.has_masks
    ts = load_test_set(c, Preprocess(32, (0.5,) * 3, (0.25,) * 3))
    assert ts.pixel_known.all()
    masks = ts.masks((32, 32))
    np.testing.assert_array_equal(masks[ts.labels == 1][0], want)
    assert not masks[ts.labels == 0].any()


def test_mask_rule_is_one_rule(tmp_path):
    """``> 0`` (anomalib's rule): 0/255 and 0/1 masks mean the same; the file readers of eval, the
    diffusion generator's data and the writer all go through it."""
    from inspector.data import mvtec
    from inspector.eval import data as eval_data
    from inspector.synth.diffusion.data import load_defect_images

    a = np.array([[0, 1, 127, 128, 255]] * 8, np.uint8)
    np.testing.assert_array_equal(mvtec.binarize_mask(a), a > 0)
    np.testing.assert_array_equal(mvtec.binarize_mask(np.dstack([a * 0, a * 0, a])), a > 0)  # any channel
    assert eval_data.read_mask is mvtec.read_mask
    for values in ((0, 255), (0, 1)):
        root = tmp_path / f"v{values[1]}"
        want = _layout_with_mask(root, ".png", values)
        path = root / "ground_truth" / "dent" / "000_mask.png"
        np.testing.assert_array_equal(mvtec.read_mask(path), want)
        (item,), _ = load_defect_images(root)  # MVTec branch
        np.testing.assert_array_equal(item[1], want)
        (item,), _ = load_defect_images(root / "test" / "dent", root / "ground_truth" / "dent")  # plain folder
        np.testing.assert_array_equal(item[1], want)
        mvtec.write_mask(tmp_path / "w.png", mvtec.read_mask(path))
        assert set(np.unique(cv2.imread(str(tmp_path / "w.png"), cv2.IMREAD_UNCHANGED))) == {0, 255}
        np.testing.assert_array_equal(mvtec.read_mask(tmp_path / "w.png"), want)
    assert mvtec.read_mask(None, (4, 6)).shape == (4, 6) and not mvtec.read_mask(None, (4, 6)).any()
    np.testing.assert_array_equal(mvtec.read_mask(path, (16, 16)), want[::2, ::2])


def test_class_folder_rule(tmp_path):
    from inspector.data.mvtec import find_class_dirs, is_class_dir
    from inspector.eval.data import find_classes

    _layout_with_mask(tmp_path / "a", ".png")
    (tmp_path / "b" / "train" / "good").mkdir(parents=True)  # train/good only: a class
    (tmp_path / "c" / "train" / "dent").mkdir(parents=True)  # no train/good, no test: not a class
    (tmp_path / ".hidden" / "test").mkdir(parents=True)
    assert [d.name for d in find_class_dirs(tmp_path)] == ["a", "b"]
    assert find_class_dirs(tmp_path / "a") == [tmp_path / "a"]
    assert not is_class_dir(tmp_path / "c") and not is_class_dir(tmp_path / "a" / "ground_truth")
    with pytest.raises(FileNotFoundError):
        read_mvtec(tmp_path / "c")
    assert [c.name for c in find_classes(tmp_path / "a")] == ["a"]
