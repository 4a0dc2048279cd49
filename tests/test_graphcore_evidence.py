"""GraphCore on a product's real evidence: the defaults, the selection rule, confirmed normals in the
bank, the head's training on confirmed defects.

Real images: scikit-image's brick texture, 128 px crops, the real EfficientNet-Lite0 weights (the
``lite0`` fixture). The "confirmed" evidence is built so that each test's property can fail: normals
whose whole-image contrast varies (the global branch flags them), defects that are a whole-image
blur (only the global branch sees them), dark stains of one shape for training and of another
for testing. Run with ``-s`` to see the held-out numbers the rule decided on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inspector.detectors.base import FitEvidence
from inspector.detectors.graphcore.detector import GraphCore, PatchCoreKNN
from inspector.detectors.graphcore.selection import (
    MIN_DEFECTS,
    SEP_MARGIN,
    auroc,
    raises,
    separation,
    source_min,
)

SIZE = 128
#: a short but real head training
QUICK = {"train_steps": 30, "train_defects": 8, "train_normals": 2, "cv_steps": 15}


def crops(brick: np.ndarray, rng: np.random.Generator, n: int, size: int = SIZE) -> list[np.ndarray]:
    ys = rng.integers(0, brick.shape[0] - size, n)
    xs = rng.integers(0, brick.shape[1] - size, n)
    return [np.ascontiguousarray(brick[y : y + size, x : x + size]) for y, x in zip(ys, xs)]


def stain(img: np.ndarray, rng: np.random.Generator, radius: float, elong: float, dark: float) -> np.ndarray:
    """A soft dark stain (an ellipse ``elong`` times longer than wide, random angle) at a random place."""
    cy, cx = rng.integers(24, SIZE - 24, 2)
    a = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:SIZE, :SIZE] - np.array([cy, cx])[:, None, None]
    u = (np.cos(a) * xx + np.sin(a) * yy) / elong
    v = -np.sin(a) * xx + np.cos(a) * yy
    m = np.clip(1.5 - np.hypot(u, v) / radius, 0, 1)[..., None]
    return (img.astype(np.float32) * (1 - dark * m)).astype(np.uint8)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    x = img.astype(np.float32)
    return np.clip(x.mean() + factor * (x - x.mean()), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, sigma: float = 1.2) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img, (0, 0), sigma)


def evidence(lite0, normals: list[np.ndarray], defects: list[np.ndarray]) -> FitEvidence:
    empty = torch.zeros(0, 3, SIZE, SIZE)
    return FitEvidence(lite0.preprocess(normals) if normals else empty,
                       lite0.preprocess(defects) if defects else empty, [None] * len(defects))


@pytest.fixture(scope="module")
def shots(lite0, brick):
    return lite0.preprocess(crops(brick, np.random.default_rng(10), 3))


def candidates(det) -> dict[str, dict]:
    return {c["name"]: c for c in det.fit_info["selection"]["candidates"]}


# ---------------------------------------------------------------------------------------------
# The rule's measures and the distance table, on numbers
# ---------------------------------------------------------------------------------------------
def test_auroc_separation_and_the_rule_on_numbers():
    n, d = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0])
    assert auroc(n, d) == pytest.approx((0.5 + 1 + 0 + 1 + 1 + 1) / 6)  # ties count one half
    assert auroc(d + 10, n) == 0.0 and math.isnan(auroc(n, d[:0]))
    s = separation(n, d)
    assert s > 0 and separation(n * 7, d * 7) == pytest.approx(s)  # scale-free: units do not matter
    assert separation(d, n) == pytest.approx(-s)
    cur = {"auroc": 0.8, "separation": 1.0}
    pairs = 20  # one pair = 0.05
    assert not raises(dict(cur), cur, pairs)  # as good is not better
    assert raises({"auroc": 0.85, "separation": 1.0}, cur, pairs)  # one pair more, separation kept
    assert not raises({"auroc": 0.84, "separation": 1.0}, cur, pairs)  # less than a pair
    assert raises({"auroc": 0.8, "separation": 1.0 + SEP_MARGIN}, cur, pairs)
    assert not raises({"auroc": 0.8, "separation": 1.0 + SEP_MARGIN / 2}, cur, pairs)
    assert not raises({"auroc": 0.95, "separation": 0.9}, cur, pairs)  # AUROC up, separation down
    assert not raises({"auroc": 0.75, "separation": 3.0}, cur, pairs)  # separation up, AUROC down


def test_source_min_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 7, 5, generator=gen)
    rows = torch.randn(40, 5, generator=gen)
    src = torch.randint(-1, 3, (40,), generator=gen)
    src[src == 2] = 1  # source 2 has no row: its distance is inf
    got = source_min(queries, rows, src, 3, chunk=4)
    assert got.shape == (3, 4, 7)
    d = torch.cdist(queries.double(), rows.double())  # [3,7,40]
    for slot, s in enumerate((-1, 0, 1)):
        want = d[..., src == s].amin(-1)
        assert torch.allclose(got[:, slot].double(), want, atol=1e-4), s
    assert torch.isinf(got[:, 3]).all()


# ---------------------------------------------------------------------------------------------
# Defaults and the minimum of evidence
# ---------------------------------------------------------------------------------------------
def test_without_evidence_the_default_is_the_bank_of_the_shots(lite0, brick, shots):
    from inspector.synth.fallback import make_defect

    rng = np.random.default_rng(1)
    normal, base = crops(brick, rng, 2)
    x = lite0.preprocess([normal, make_defect(base, rng, area=(0.02, 0.05))[0]])
    gc, pc = GraphCore(lite0).fit(shots), PatchCoreKNN(lite0).fit(shots)
    a, b = gc.score(x), pc.score(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps) and torch.equal(gc.memory, pc.memory)
    assert gc.scorer.head is None and gc.scorer.descriptors is None
    sel = gc.fit_info["selection"]
    assert sel["enabled"] == {"head": False, "global_branch": False, "views": False}
    assert sel["candidates"] == [] and sel["min_defects"] == MIN_DEFECTS and "evidence_cv" not in gc.fit_info


def test_below_min_defects_nothing_is_switched_on(lite0, brick, shots):
    """With one defect fewer than the minimum the rule does not run: GraphCore is the bank of the
    shots and the confirmed normals, exactly as PatchCore with the same evidence; with the minimum
    it does run (and says what it tried)."""
    rng = np.random.default_rng(2)
    normals = crops(brick, rng, 4)
    defects = [blur(c) for c in crops(brick, rng, MIN_DEFECTS)]  # a kind the global branch would catch
    few = evidence(lite0, normals, defects[:-1])
    gc = GraphCore(lite0, **QUICK).fit(shots, evidence=few)
    pc = PatchCoreKNN(lite0).fit(shots, evidence=few)
    x = lite0.preprocess(crops(brick, rng, 3))
    assert torch.equal(gc.score(x).scores, pc.score(x).scores)
    sel = gc.fit_info["selection"]
    assert sel["enabled"] == {"head": False, "global_branch": False, "views": False} and sel["candidates"] == []
    assert "below the minimum" in sel["reason"] and sel["evidence"] == {"normals": 4, "defects": MIN_DEFECTS - 1}
    cv = gc.fit_info["evidence_cv"]
    assert len(cv["normal"]) == 4 and len(cv["defect"]) == MIN_DEFECTS - 1

    enough = GraphCore(lite0, select_parts=["global_branch"]).fit(shots, evidence=evidence(lite0, normals, defects))
    assert {"bank", "global@1"} <= set(candidates(enough))


def test_evidence_cv_is_held_out_and_in_the_model_units(lite0, brick, shots):
    """A confirmed defect is never in the bank: its held-out score is the model's score. A
    confirmed normal is in the bank (the model scores it near 0): its held-out score is what a
    model fitted without it gives it (exact while the coreset keeps every row)."""
    rng = np.random.default_rng(3)
    normals = lite0.preprocess(crops(brick, rng, 4))
    defects = lite0.preprocess([stain(c, rng, 7, 1.0, 0.6) for c in crops(brick, rng, 3)])
    ev = FitEvidence(normals, defects, [None] * 3)
    det = PatchCoreKNN(lite0).fit(shots, evidence=ev)
    assert det.fit_info["memory"] == det.fit_info["patches"] == 7 * 16 * 16  # every row kept
    cv = det.fit_info["evidence_cv"]
    assert torch.allclose(torch.tensor(cv["defect"]), det.score(defects).scores, rtol=1e-4)
    held_out = []
    for i in range(len(normals)):
        others = FitEvidence(normals[[j for j in range(len(normals)) if j != i]], defects[:0], [])
        held_out.append(float(PatchCoreKNN(lite0).fit(shots, evidence=others).score(normals[i : i + 1]).scores[0]))
    assert torch.allclose(torch.tensor(cv["normal"]), torch.tensor(held_out), rtol=1e-4)
    assert float(det.score(normals).scores.max()) < 0.5 * min(held_out)  # in the bank: the model knows them


# ---------------------------------------------------------------------------------------------
# Confirmed normals in the bank
# ---------------------------------------------------------------------------------------------
def test_confirmed_normals_enter_the_bank_and_lower_near_identical_parts(lite0, brick, shots):
    """Parts nearly identical to confirmed normals (the same part re-shot: shifted by 1 px, with
    sensor noise) score lower once those normals are in the bank, also when the coreset has to
    drop rows to keep the bank at ``memory_cap``."""
    rng = np.random.default_rng(4)
    big = crops(brick, rng, 6, SIZE + 1)
    normals = [c[:SIZE, :SIZE] for c in big]
    near = [np.clip(c[1:, 1:].astype(np.float32) + rng.normal(0, 2, c[1:, 1:].shape), 0, 255).astype(np.uint8)
            for c in big]
    x = lite0.preprocess(near)
    before = GraphCore(lite0).fit(shots).score(x).scores
    ev = evidence(lite0, normals, [])
    for cap in (4096, 600):
        det = GraphCore(lite0, memory_cap=cap).fit(shots, evidence=ev)
        after = det.score(x).scores
        print(f"\n[normals in bank, cap {cap}] near-identical parts: before {before.tolist()} after {after.tolist()}")
        assert det.fit_info["patches"] == (3 + 6) * 16 * 16 and det.memory.shape[0] == min(cap, (3 + 6) * 256)
        assert (after < before).all() and float((after / before).mean()) < 0.8


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------
def test_rule_switches_off_a_part_that_lowers_separation(lite0, brick, shots):
    """A product whose normal parts vary in overall contrast (each confirmed normal differently)
    and whose defects are local stains: the global branch flags the normals, so on this product's
    evidence every weight of it lowers the held-out separation, and the rule leaves it off."""
    rng = np.random.default_rng(5)
    normals = [contrast(c, f) for c, f in zip(crops(brick, rng, 6), (0.6, 1.4, 0.7, 1.3, 0.75, 1.25))]
    defects = [stain(c, rng, 7, 1.0, 0.6) for c in crops(brick, rng, 4)]
    ev = evidence(lite0, normals, defects)
    det = GraphCore(lite0, select_parts=["global_branch"]).fit(shots, evidence=ev)
    cands = candidates(det)
    print("\n[global flags normals]", {k: (v["auroc"], v["separation"]) for k, v in cands.items()})
    glob = [v for k, v in cands.items() if k.startswith("global@")]
    assert len(glob) == len(det.config.weight_grid)
    assert all(v["separation"] < cands["bank"]["separation"] for v in glob)  # the construction holds
    sel = det.fit_info["selection"]
    assert sel["enabled"]["global_branch"] is False and det.scorer.descriptors is None
    x = lite0.preprocess(crops(brick, rng, 2))
    assert torch.equal(det.score(x).scores, PatchCoreKNN(lite0).fit(shots, evidence=ev).score(x).scores)


def test_rule_switches_on_a_part_that_raises_separation_and_keeps_it(tmp_path, lite0, brick, shots):
    """The counterpart: defects that are whole-image changes (out of focus: no patch stands out)
    are what the global branch sees; the rule switches it on with the weight that separated best,
    the decision and the held-out scores are saved with the state, and registration folds that
    reuse the fitted detector take its parts."""
    rng = np.random.default_rng(6)
    normals = crops(brick, rng, 6)
    defects = [blur(c) for c in crops(brick, rng, 4)]
    ev = evidence(lite0, normals, defects)
    det = GraphCore(lite0, select_parts=["global_branch"]).fit(shots, evidence=ev)
    cands = candidates(det)
    print("\n[global sees blur]", {k: (v["auroc"], v["separation"]) for k, v in cands.items()})
    sel = det.fit_info["selection"]
    assert sel["enabled"] == {"head": False, "global_branch": True, "views": False}
    best = max((v for k, v in cands.items() if k.startswith("global@")), key=lambda v: (v["auroc"], v["separation"]))
    assert sel["weights"]["global_branch"] == best["global_weight"] == det.effective.global_weight
    assert raises(best, cands["bank"], 6 * 4) and det.scorer.descriptors is not None
    cv = det.fit_info["evidence_cv"]
    assert auroc(torch.tensor(cv["normal"]), torch.tensor(cv["defect"])) == best["auroc"]
    assert det.config.global_branch is False  # the request stays as asked; the fit's choice is `effective`

    stem = det.save(tmp_path / "g")
    loaded = GraphCore.load(stem, lite0)
    x = lite0.preprocess(crops(brick, rng, 2) + [blur(crops(brick, rng, 1)[0])])
    assert torch.equal(loaded.score(x).scores, det.score(x).scores)
    assert loaded.fit_info["selection"] == sel and loaded.fit_info["evidence_cv"] == cv
    assert loaded.effective == det.effective

    fold = GraphCore(lite0, select_parts=["global_branch"]).fit(shots[:2], reuse_head_of=det)
    assert fold.effective == det.effective and fold.scorer.descriptors is not None
    assert "reuse_head_of" in fold.fit_info["selection"]["reason"]
    with pytest.raises(ValueError, match="same class and config"):
        GraphCore(lite0).fit(shots[:2], reuse_head_of=det)


@pytest.mark.slow
def test_head_trained_with_real_defects_separates_a_held_out_family_better(lite0, brick, shots):
    """The head trains on generated Perlin blends, with and without 8 confirmed defects of one
    family (small round dark spots, image-level labels only: the multiple-instance loss). Tested
    on another family never used for training (fainter elongated stains): the head that saw real
    defects separates them from new normal parts better."""
    rng = np.random.default_rng(0)
    normals = crops(brick, rng, 6)
    spots = [stain(c, rng, rng.uniform(4, 7), 1.0, 0.6) for c in crops(brick, rng, 8)]
    with_real, generated_only = evidence(lite0, normals, spots), evidence(lite0, normals, [])
    test_n = lite0.preprocess(crops(brick, rng, 16))
    test_d = lite0.preprocess([stain(c, rng, rng.uniform(3, 5), 3.0, 0.4) for c in crops(brick, rng, 16)])
    result = {}
    for name, ev in (("generated only", generated_only), ("with real defects", with_real)):
        det = GraphCore(lite0, head=True, select="off", train_steps=60, train_defects=12,
                        train_normals=2).fit(shots, evidence=ev, generator="perlin")
        sn, sd = det.score(test_n).scores, det.score(test_d).scores
        result[name] = (auroc(sn, sd), separation(sn, sd))
        assert det.fit_info["head"]["real_defects"] == len(ev.defects)
    print(f"\n[held-out family: elongated stains] (AUROC, separation): {result}")
    assert result["with real defects"][0] > result["generated only"][0]
    assert result["with real defects"][1] > result["generated only"][1]


@pytest.mark.slow
def test_rule_with_every_part_writes_its_decision(lite0, brick, shots):
    """The whole rule (views, head with folds, global branch): every candidate measured, the
    decision consistent with the numbers, held-out scores for every piece of evidence."""
    rng = np.random.default_rng(7)
    normals = crops(brick, rng, 5)
    defects = [stain(c, rng, 6, 1.0, 0.6) for c in crops(brick, rng, 3)]
    det = GraphCore(lite0, candidate_views=3, **QUICK).fit(shots, evidence=evidence(lite0, normals, defects))
    sel = det.fit_info["selection"]
    names = [c["name"] for c in sel["candidates"]]
    assert names[:2] == ["bank", "views=3"] and {"head@1", "global@1"} <= set(names)
    assert sel["folds"] == 3 and sel["evidence"] == {"normals": 5, "defects": 3}
    assert len(det.fit_info["evidence_cv"]["normal"]) == 5 and len(det.fit_info["evidence_cv"]["defect"]) == 3
    assert sel["enabled"]["head"] == (det.scorer.head is not None) == det.effective.head
    assert sel["enabled"]["views"] == (det.effective.views == 3)
    print("\n[whole rule]", sel["reason"])
