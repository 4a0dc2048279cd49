"""Sample products: layout, determinism, caching, build time."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from inspector.data.mvtec import folder_kwargs, read_mvtec
from inspector.data.samples import PRODUCTS, build_sample


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
    from inspector.data.samples import estimate_local_mask, textile_local_defects

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
