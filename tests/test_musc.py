"""MuSc: each stage against a brute-force reference with explicit loops, small-N behaviour, chunking,
aligned mode, divide_num, state, and detection of a synthetic defect on real texture crops."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from inspector.detectors.musc.budget import msm_flops
from inspector.detectors.musc.detector import MuSc
from inspector.detectors.musc.torch_model import (
    interval_bounds,
    lnamd,
    mmo,
    msm,
    position_compensate,
    rscin,
)

# ---------------------------------------------------------------------------------------------
# brute-force references (explicit loops, float64), written from the official code's semantics
# ---------------------------------------------------------------------------------------------


def ref_lnamd(feat: torch.Tensor, r: int) -> torch.Tensor:
    """Official LNAMD for one layer: LayerNorm([C,h,w]), r x r zero-padded neighbourhood gathered
    as a channel-major C*r*r vector (nn.Unfold order), adaptive_avg_pool1d to C (MeanMapper),
    then L2 normalisation (done in the official musc.py)."""
    n, h, w, c = feat.shape
    out = torch.zeros(n, h, w, c, dtype=torch.float64)
    for i in range(n):
        x = feat[i].double()
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        xn = (x - mu) / torch.sqrt(var + 1e-5)
        for y in range(h):
            for xx in range(w):
                vec = torch.zeros(c, r, r, dtype=torch.float64)
                for dy in range(r):
                    for dx in range(r):
                        yy, xs = y + dy - r // 2, xx + dx - r // 2
                        if 0 <= yy < h and 0 <= xs < w:
                            vec[:, dy, dx] = xn[yy, xs]
                pooled = F.adaptive_avg_pool1d(vec.reshape(1, 1, -1), c).reshape(c)
                out[i, y, xx] = pooled / pooled.norm()
    return out


def ref_bounds(n_ref: int, lo: float, hi: float, clamp: bool = True) -> tuple[int, int]:
    k_hi, k_lo = int(n_ref * hi), int(n_ref * lo)
    if clamp:
        k_hi = min(max(k_hi, 1), n_ref)
        k_lo = min(k_lo, k_hi - 1)
    return k_lo, k_hi


def ref_msm(z: torch.Tensor, topmin=(0.0, 0.3), radius: int | None = None, clamp: bool = True) -> np.ndarray:
    """Loops over i, p, j, q: nearest-patch distance per other image, sort, interval mean."""
    n, h, w, c = z.shape
    zz = z.double().numpy()
    out = np.zeros((n, h, w))
    k_lo, k_hi = ref_bounds(n - 1, *topmin, clamp=clamp)
    for i in range(n):
        for py in range(h):
            for px in range(w):
                mins = []
                for j in range(n):
                    if j == i:
                        continue
                    best = math.inf
                    for qy in range(h):
                        for qx in range(w):
                            if radius is not None and (abs(qy - py) > radius or abs(qx - px) > radius):
                                continue
                            d = math.sqrt(float(((zz[i, py, px] - zz[j, qy, qx]) ** 2).sum()))
                            best = min(best, d)
                    mins.append(best)
                mins.sort()
                sel = mins[k_lo:k_hi]
                out[i, py, px] = sum(sel) / len(sel) if sel else float("nan")
    return out


def ref_rscin(scores: np.ndarray, feats: np.ndarray, k_list=(1, 2, 3)) -> np.ndarray:
    """Official RsCIN/MMO with its explicit loops; output mapped back to the raw score range."""
    lo, hi = scores.min(), scores.max()
    s = (scores - lo) / (hi - lo)
    w = feats @ feats.T
    n = len(s)
    outs = []
    for k in k_list:
        w_mask = w.copy()
        for i in range(n):
            smallest = np.argsort(w[i])[: n - k]  # the official topk(N-k, largest=False)
            w_mask[i, smallest] = 0
        d = np.zeros((n, n))
        for i in range(n):
            d[i, i] = 1.0 / w_mask[i].sum()
        outs.append(d @ w_mask @ s)
    return lo + np.mean(outs, axis=0) * (hi - lo)


# ---------------------------------------------------------------------------------------------
# stage tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_matches_bruteforce(r):
    torch.manual_seed(0)
    feat = torch.randn(3, 5, 6, 4) * 2 + 0.5  # non-square grid, C=4
    got = lnamd(feat, r)
    assert got.shape == feat.shape
    torch.testing.assert_close(got.double(), ref_lnamd(feat, r), atol=1e-5, rtol=0)


def test_lnamd_rejects_even_r():
    with pytest.raises(ValueError):
        lnamd(torch.randn(2, 3, 3, 4), 2)


@pytest.mark.parametrize("topmin", [(0.0, 0.3), (0.0, 0.5), (0.2, 0.8), (0.0, 1.0)])
def test_msm_matches_bruteforce(topmin):
    torch.manual_seed(1)
    z = lnamd(torch.randn(7, 3, 4, 5), 1)
    want = ref_msm(z, topmin)
    assert np.isfinite(want).all()
    for kw in ({}, {"chunk_size": 2, "symmetric": True}, {"chunk_size": 3, "symmetric": False}):
        got = msm(z, topmin, **kw)
        np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=0)


def test_msm_official_interval_for_n_ge_5():
    # N >= 5 with (0, 0.3): the clamp never triggers, so the numbers are the official ones.
    for n in range(5, 40):
        assert interval_bounds(n - 1, (0.0, 0.3)) == ref_bounds(n - 1, 0.0, 0.3, clamp=False)
    torch.manual_seed(2)
    z = lnamd(torch.randn(6, 3, 3, 4), 3)
    np.testing.assert_allclose(msm(z).double().numpy(), ref_msm(z, clamp=False), atol=1e-5, rtol=0)


def test_msm_aligned_matches_bruteforce():
    torch.manual_seed(3)
    z = lnamd(torch.randn(6, 4, 5, 4), 1)
    for radius in (0, 1, 2):
        want = ref_msm(z, (0.0, 0.5), radius=radius)
        for chunk in (None, 2, 4):
            got = msm(z, (0.0, 0.5), align_radius=radius, chunk_size=chunk)
            np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=0)
    # a window covering the whole grid is the unaligned computation
    torch.testing.assert_close(msm(z, align_radius=5), msm(z), atol=1e-5, rtol=0)


def test_rscin_matches_bruteforce():
    rng = np.random.default_rng(0)
    n = 9
    feats = 1.0 + 0.4 * rng.standard_normal((n, 16))  # image features share a direction: positive sims
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    scores = rng.random(n) * 3 + 1
    for k_list in ((1, 2, 3), (1, 8, 9), (2,)):
        got = rscin(torch.tensor(scores), torch.tensor(feats), k_list).numpy()
        np.testing.assert_allclose(got, ref_rscin(scores, feats, k_list), atol=1e-5, rtol=0)
    # k = 1 keeps only the image itself: identity
    np.testing.assert_allclose(rscin(torch.tensor(scores), torch.tensor(feats), (1,)).numpy(), scores, atol=1e-9)
    # k = 0 (official "off"), no features, or equal scores: unchanged, never NaN
    np.testing.assert_allclose(rscin(torch.tensor(scores), torch.tensor(feats), (0,)).numpy(), scores)
    np.testing.assert_allclose(rscin(torch.tensor(scores), None).numpy(), scores)
    flat = torch.ones(n)
    assert torch.equal(rscin(flat, torch.tensor(feats)), flat)


def test_mmo_clamps_negative_similarity_and_k():
    sim = torch.tensor([[1.0, -0.9, -0.8], [-0.9, 1.0, 0.5], [-0.8, 0.5, 1.0]])
    s = torch.tensor([1.0, 0.0, 0.5])
    out = mmo(sim, s, (1, 2, 3, 10))  # k=10 clamps to N=3
    assert torch.isfinite(out).all()
    # image 0's only positive neighbour is itself: its score stays 1
    assert out[0].item() == pytest.approx(1.0)


def test_msm_flops_matches_stats():
    torch.manual_seed(0)
    z = lnamd(torch.randn(7, 3, 4, 5), 1)
    for sym in (True, False):
        for chunk in (1, 3, 7):
            st = {}
            msm(z, chunk_size=chunk, symmetric=sym, stats=st)
            assert st["flops"] == msm_flops(7, 12, 5, symmetric=sym, chunk=chunk)
    st = {}
    msm(z, align_radius=1, stats=st)
    assert st["flops"] == msm_flops(7, 12, 5, kk=9)
    assert msm_flops(7, 12, 5, symmetric=True, chunk=1) < msm_flops(7, 12, 5, symmetric=False, chunk=1)


# ---------------------------------------------------------------------------------------------
# small N, chunking, divide_num, state
# ---------------------------------------------------------------------------------------------


def _feats(n, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, h, w, 6, generator=g), "b": torch.randn(n, h, w, 3, generator=g)}


def test_n1_is_a_clear_error(tiny_cnn):
    m = MuSc(tiny_cnn)
    with pytest.raises(ValueError, match="at least 2 images"):
        m.score_features(_feats(1))
    with pytest.raises(ValueError, match="at least 2 images"):
        m.score(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError):
        msm(lnamd(torch.randn(1, 3, 3, 4), 1))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_small_n_degraded_but_valid(tiny_cnn, n):
    # Defined behaviour: the interval holds exactly one image, the most similar one.
    assert interval_bounds(n - 1, (0.0, 0.3)) == (0, 1)
    z = lnamd(torch.randn(n, 3, 3, 4), 1)
    np.testing.assert_allclose(msm(z).double().numpy(), ref_msm(z, clamp=True), atol=1e-5, rtol=0)
    assert np.isnan(ref_msm(z, clamp=False)).all()  # what the official interval would give
    res = MuSc(tiny_cnn).score_features(_feats(n), image_size=(32, 32))
    assert res.maps.shape == (n, 32, 32) and res.scores.shape == (n,)
    assert torch.isfinite(res.maps).all() and torch.isfinite(res.scores).all()


def test_constant_images_no_nan(tiny_cnn):
    x = torch.zeros(5, 3, 64, 64)
    res = MuSc(tiny_cnn).score(x)
    assert torch.isfinite(res.maps).all() and torch.isfinite(res.scores).all()


def test_chunked_equals_unchunked(tiny_cnn):
    feats = _feats(9, 5, 6, seed=4)
    base = MuSc(tiny_cnn, chunk_size=9, symmetric=True).score_features(feats)
    for kw in ({"chunk_size": 1}, {"chunk_size": 2, "symmetric": True}, {"chunk_size": 4, "symmetric": False},
               {"chunk_size": None}):
        res = MuSc(tiny_cnn, **kw).score_features(feats)
        torch.testing.assert_close(res.maps, base.maps, atol=1e-5, rtol=0)
        torch.testing.assert_close(res.scores, base.scores, atol=1e-5, rtol=0)


def test_official_mode_is_mean_of_msm_over_layers_and_r(tiny_cnn):
    feats = _feats(6, seed=5)
    m = MuSc(tiny_cnn, position_norm=False, rscin=False, sigma=0)
    res = m.score_features(feats, image_size=(4, 4))
    want = sum(msm(lnamd(f, r)) for f in feats.values() for r in (1, 3, 5)) / 6
    torch.testing.assert_close(m.last_info["patch_scores"], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.scores, want.flatten(1).amax(1), atol=1e-6, rtol=0)


def test_position_compensation():
    p = torch.rand(5, 4, 4) + 1.0  # no clamping at 0 in this range
    border = torch.zeros(4, 4)
    border[0] = 1.0  # a baseline shared by every image
    out = position_compensate(p + border)
    torch.testing.assert_close(out, position_compensate(p) + border.mean(), atol=1e-6, rtol=0)
    assert out.mean().item() == pytest.approx((p + border).mean().item(), abs=1e-6)  # level kept
    assert (position_compensate(torch.rand(5, 4, 4)) >= 0).all()  # still a distance


def test_divide_num_scores_subsets_independently(tiny_cnn):
    feats = _feats(10, seed=6)
    m = MuSc(tiny_cnn, divide_num=2, rscin=False, seed=3)
    res = m.score_features(feats, image_size=(4, 4))
    subsets = m._subsets(10, torch.device("cpu"))
    assert sorted(torch.cat(subsets).tolist()) == list(range(10)) and all(len(s) == 5 for s in subsets)
    for idx in subsets:
        sub = MuSc(tiny_cnn, rscin=False).score_features({k: v[idx] for k, v in feats.items()}, image_size=(4, 4))
        torch.testing.assert_close(res.scores[idx], sub.scores, atol=1e-6, rtol=0)
    # never a subset of 1: divide_num is reduced to N // 2
    assert [len(s) for s in MuSc(tiny_cnn, divide_num=5)._subsets(5, torch.device("cpu"))] == [3, 2]


def test_state_roundtrip(tiny_cnn, tmp_path):
    from inspector.state import load_state, save_state

    m = MuSc(tiny_cnn, r_list=(1, 3), topmin=(0.1, 0.5), aligned=True, align_radius=2, divide_num=3, sigma=2)
    assert m.fit(torch.zeros(2, 3, 64, 64)) is m
    assert MuSc.name == "musc" and MuSc.batchwise and not MuSc.needs_fit
    tensors, config = m.state()
    assert tensors == {}
    save_state(tmp_path / "musc", tensors, config)
    t2, c2 = load_state(tmp_path / "musc")
    m2 = MuSc.from_state(tiny_cnn, t2, c2)
    assert m2.config() == m.config()


def test_bad_arguments(tiny_cnn):
    with pytest.raises(ValueError):
        MuSc(tiny_cnn, r_list=(2,))
    with pytest.raises(ValueError):
        MuSc(tiny_cnn, topmin=(0.5, 0.3))
    with pytest.raises(ValueError):
        MuSc(tiny_cnn, precision="fp8")
    with pytest.raises(KeyError):
        MuSc(tiny_cnn, layers=("nope",)).score_features(_feats(3))
    with pytest.raises(ValueError, match="image_features"):
        MuSc(tiny_cnn).score_features(_feats(3), image_features=torch.randn(4, 8))


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    z = lnamd(torch.randn(6, 4, 4, 16), 1)
    a, b = msm(z), msm(z, precision="bf16")
    assert (a - b).abs().max() < 0.05
    a, b = msm(z, align_radius=1), msm(z, align_radius=1, precision="bf16")
    assert (a - b).abs().max() < 0.05


def test_clip_backbone_uses_global_embedding():
    from inspector.backbones.registry import load_backbone

    bb = load_backbone("clip/tiny", device="cpu")
    m = MuSc(bb, r_list=(1, 3))
    x = torch.randn(4, 3, bb.preprocess.size, bb.preprocess.size)
    feats, glob = m.extract(x)
    assert glob is not None and glob.shape[0] == 4
    res = m.score(x)
    assert res.maps.shape == (4, bb.preprocess.size, bb.preprocess.size)
    assert torch.isfinite(res.scores).all()


# ---------------------------------------------------------------------------------------------
# real texture: one defective crop among brick crops, offline EfficientNet-Lite0
# ---------------------------------------------------------------------------------------------


def _make_defect(img: np.ndarray, seed: int, kind: str = "perlin") -> tuple[np.ndarray, np.ndarray]:
    from inspector.synth.fallback import make_defect

    out, mask = make_defect(img, np.random.default_rng(seed), kind)
    return out, mask.astype(bool)


def _brick_set(brick, n, seed, defect_index, size=128, crop=160):
    """``n`` crops of one product: scikit-image's brick is a perspective photo (bricks grow and
    tilt towards the edges), so the crops come from its central band, where the bricks look alike,
    as parts of one product would; one crop gets a DRAEM-style Perlin defect."""
    rng = np.random.default_rng(seed)
    offs = np.stack([rng.integers(100, 251, n), rng.integers(150, 231, n)], 1)
    crops = [cv2.resize(brick[y:y + crop, x:x + crop], (size, size), interpolation=cv2.INTER_AREA) for y, x in offs]
    crops[defect_index], mask = _make_defect(crops[defect_index], seed + 100)
    return crops, mask


def _save_maps_png(path, crops, res, mask, k, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(crops)
    fig, ax = plt.subplots(2, n, figsize=(2 * n, 4.4))
    vmin, vmax = float(res.maps.min()), float(res.maps.max())
    for i in range(n):
        ax[0, i].imshow(crops[i])
        if i == k:
            ax[0, i].contour(mask, levels=[0.5], colors="r", linewidths=0.8)
        ax[0, i].set_title(f"{'DEFECT ' if i == k else ''}{res.scores[i]:.3f}", fontsize=8)
        ax[1, i].imshow(res.maps[i], vmin=vmin, vmax=vmax, cmap="jet")
        am = divmod(int(res.maps[i].argmax()), res.maps.shape[-1])
        ax[1, i].plot(am[1], am[0], "w+", ms=8)
        ax[0, i].axis("off")
        ax[1, i].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


@pytest.mark.slow
def test_brick_defect_ranked_first_and_localised(lite0, brick, artifacts_dir):
    n, k = 9, 4
    crops, mask = _brick_set(brick, n, seed=0, defect_index=k)
    x = lite0.preprocess(crops)
    m = MuSc(lite0)
    res = m.score(x)
    _save_maps_png(artifacts_dir / "musc_brick.png", crops, res, mask, k,
                   "MuSc on 9 brick crops (lite0, 128 px): score above, map below (shared scale, + = argmax)")
    assert torch.isfinite(res.maps).all()
    assert int(res.scores.argmax()) == k, res.scores
    assert int(m.last_info["raw_scores"].argmax()) == k
    peak = divmod(int(res.maps[k].argmax()), res.maps.shape[-1])
    dilated = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    assert dilated[peak], (peak, np.argwhere(mask).mean(0))
    # the defect is the hottest region of the whole set
    assert res.maps[k].max() == res.maps.max()


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 4])
def test_brick_small_n(lite0, brick, n):
    crops, mask = _brick_set(brick, 9, seed=0, defect_index=0)
    crops = crops[:n]
    res = MuSc(lite0).score(lite0.preprocess(crops))
    assert torch.isfinite(res.maps).all() and torch.isfinite(res.scores).all()
    assert int(res.scores.argmax()) == 0, res.scores
    peak = divmod(int(res.maps[0].argmax()), res.maps.shape[-1])
    assert (cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0)[peak]


@pytest.mark.slow
def test_aligned_mode_on_fixtured_parts(lite0, brick, artifacts_dir):
    """Fixtured parts: the same scene with +-2 px jitter and sensor noise; aligned mode finds the
    defect like the full comparison with a small fraction of the matmul work."""
    rng = np.random.default_rng(7)
    base = cv2.resize(brick[100:260, 200:360], (128, 128), interpolation=cv2.INTER_AREA)
    crops = []
    for _ in range(8):
        dy, dx = rng.integers(-2, 3, 2)
        mat = np.float32([[1, 0, dx], [0, 1, dy]])
        im = cv2.warpAffine(base, mat, (128, 128), borderMode=cv2.BORDER_REFLECT)
        crops.append(np.clip(im + rng.normal(0, 3, im.shape), 0, 255).astype(np.uint8))
    k = 5
    crops[k], mask = _make_defect(crops[k], 11)
    x = lite0.preprocess(crops)
    full = MuSc(lite0)
    al = MuSc(lite0, aligned=True, align_radius=1)
    feats, _ = full.extract(x)
    r_full = full.score_features(feats, (128, 128))
    r_al = al.score_features(feats, (128, 128))
    _save_maps_png(artifacts_dir / "musc_aligned.png", crops, r_al, mask, k,
                   "MuSc aligned (radius 1) on jittered copies of one brick crop")
    for r in (r_full, r_al):
        assert int(r.scores.argmax()) == k
        peak = divmod(int(r.maps[k].argmax()), 128)
        assert (cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0)[peak]
    assert al.last_info["flops"] * 10 < full.last_info["flops"]


# ---------------------------------------------------------------------------------------------
# preset="official" against a port of xrli-U/MuSc models/musc.py (image size != patch grid)
# ---------------------------------------------------------------------------------------------


def _official_musc(layers: list[torch.Tensor], cls: torch.Tensor, image_size: int, r_list=(1, 3, 5),
                   k_list=(1, 2, 3)) -> tuple[np.ndarray, np.ndarray]:
    """The official pipeline on CLS-prefixed tokens ``[N, 1+L, C]`` per layer: LNAMD (Unfold +
    adaptive_avg_pool1d), MSM (compute_scores_fast), bilinear upsampling with align_corners=True,
    image score = max of the upsampled map, RsCIN (MMO with row loops)."""
    with torch.no_grad():
        return _official_musc_impl(layers, cls, image_size, r_list, k_list)


def _official_musc_impl(layers, cls, image_size, r_list, k_list):
    n = cls.shape[0]
    maps_r = []
    for r in r_list:
        z_layers = []
        for feat in layers:
            f = feat[:, 1:, :].double()
            side = int(math.sqrt(f.shape[1]))
            f = f.reshape(n, side, side, -1).permute(0, 3, 1, 2)
            f = torch.nn.LayerNorm(list(f.shape[1:]), dtype=torch.float64)(f)
            c = f.shape[1]
            if r != 1:
                u = torch.nn.Unfold(kernel_size=r, stride=1, padding=(r - 1) // 2)(f)
                u = u.reshape(n, c, r, r, -1).permute(0, 4, 1, 2, 3)  # [N, L, C, r, r]
                f = F.adaptive_avg_pool1d(u.reshape(-1, 1, c * r * r), c).reshape(n, -1, c)
            else:
                f = f.reshape(n, c, -1).permute(0, 2, 1)
            z_layers.append(f / f.norm(dim=-1, keepdim=True))
        maps_l = []
        for z in z_layers:
            rows = []
            for i in range(n):
                ref = torch.cat((z[:i], z[i + 1:]))
                p2i = torch.cdist(z[i:i + 1], ref.reshape(-1, z.shape[-1])).reshape(z.shape[1], n - 1, z.shape[1])
                p2i = p2i.min(-1)[0]
                k_max, k_min = int(p2i.shape[1] * 0.3), 0
                vals = torch.topk(p2i, k_max, largest=False, sorted=True)[0]
                vals = torch.topk(vals, k_max - k_min, largest=True, sorted=True)[0]
                rows.append(vals.mean(1))
            maps_l.append(torch.stack(rows))
        maps_r.append(torch.stack(maps_l).mean(0))
    amap = torch.stack(maps_r).mean(0)
    side = int(math.sqrt(amap.shape[1]))
    amap = F.interpolate(amap.view(n, 1, side, side), size=image_size, mode="bilinear", align_corners=True)
    amap = amap.numpy()
    score = amap.reshape(n, -1).max(-1)
    # RsCIN
    s = (score - score.min()) / (score.max() - score.min())
    tok = cls.double().numpy()
    w = torch.tensor(tok @ tok.T)
    outs = []
    for k in k_list:
        _, idx = torch.topk(w, w.shape[0] - k, largest=False, sorted=True)
        wm = w.clone()
        for i in range(n):
            wm[i, idx[i]] = 0
        d = torch.zeros_like(w)
        for i in range(n):
            d[i, i] = 1 / wm[i].sum()
        outs.append((d @ wm) @ torch.tensor(s).unsqueeze(-1))
    return amap[:, 0], torch.cat(outs, -1).mean(-1).numpy()


@pytest.mark.parametrize("dataset, k_list", [("mvtec", (1, 2, 3)), ("visa", (1, 8, 9))])
def test_official_preset_matches_official_pipeline(tiny_cnn, dataset, k_list):
    g = torch.Generator().manual_seed(7)
    n, side, size = 10, 5, 40  # 5x5 grid to 40 px (39/4 not whole): interior patch centres fall between pixels
    tokens = [torch.randn(n, 1 + side * side, c, generator=g) for c in (6, 4)]
    glob = F.normalize(torch.rand(n, 8, generator=g) + 0.1, dim=-1)  # positive similarities, as CLIP's
    feats = {f"l{i}": t[:, 1:].reshape(n, side, side, -1) for i, t in enumerate(tokens)}
    m = MuSc(tiny_cnn, preset="official", dataset=dataset)
    assert m.rscin_k == k_list and not m.position_norm and m.sigma == 0 and m.align_corners
    res = m.score_features(feats, image_size=(size, size), image_features=glob)
    maps, scores = _official_musc(tokens, glob, size, k_list=k_list)
    np.testing.assert_allclose(res.maps.numpy(), maps, atol=1e-5, rtol=0)
    raw = m.last_info["raw_scores"].double()
    ours = (res.scores.double() - raw.min()) / (raw.max() - raw.min())  # the official [0, 1] RsCIN output
    np.testing.assert_allclose(ours.numpy(), scores, atol=1e-5, rtol=0)
    # the upsampled max differs from the patch-grid max: the image-score rule is exercised
    assert (m.last_info["raw_scores"] < m.last_info["patch_scores"].flatten(1).amax(1) - 1e-6).any()


def test_project_preset_is_the_default_and_differs(tiny_cnn):
    feats = _feats(8, 5, 5, seed=9)
    d = MuSc(tiny_cnn)
    assert d.preset == "project" and d.position_norm and d.sigma == 4.0 and not d.align_corners
    a = d.score_features(feats, image_size=(37, 37))
    b = MuSc(tiny_cnn, preset="official").score_features(feats, image_size=(37, 37))
    assert not torch.allclose(a.maps, b.maps)
    with pytest.raises(ValueError, match="preset"):
        MuSc(tiny_cnn, preset="paper")
    assert MuSc.from_state(tiny_cnn, {}, MuSc(tiny_cnn, preset="official", dataset="visa").config()).rscin_k == (1, 8, 9)


def test_default_image_size_official_518_on_vit_l():
    assert MuSc.default_image_size("clip/ViT-L-14-336", {"preset": "official"}) == 518
    assert MuSc.default_image_size("clip/ViT-L-14-336", {}) is None
    assert MuSc.default_image_size("efficientnet-lite0", {"preset": "official"}) is None
