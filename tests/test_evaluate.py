"""Evaluation harness: metrics against hand-computed values and sklearn, data reading, protocols,
tables/JSON/plots, and the `inspector eval` CLI. Uses a tiny stand-in scorer defined here (not
shipped) so these tests do not depend on the real detectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from inspector.data.mvtec import write_mvtec
from inspector.eval import data as ed
from inspector.eval import measure as me
from inspector.eval import metrics as em
from inspector.eval import runner as ev
from inspector.eval import tables as et


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny tensor ops: one thread avoids OpenMP barrier waits, which cost
    20x on a shared, busy CPU. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- metrics: by hand


def test_image_metrics_hand_computed():
    # ranked: 0.8(+) 0.4(-) 0.35(+) 0.1(-)
    # AUROC: positive/negative pairs ordered right: (0.8>0.4, 0.8>0.1, 0.35>0.1) = 3 of 4
    # AP: precision 1 at recall 1/2, 2/3 at recall 1 -> 0.5*1 + 0.5*2/3
    # F1-max: threshold 0.35 -> P=2/3, R=1 -> F1 = 0.8 (threshold 0.8 gives 2/3)
    m = em.image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert m["image_auroc"] == pytest.approx(0.75)
    assert m["image_ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert m["image_f1max"] == pytest.approx(0.8, abs=1e-6)


def test_image_metrics_ties_and_perfect():
    assert em.image_metrics([0.5, 0.5], [0, 1])["image_auroc"] == pytest.approx(0.5)
    m = em.image_metrics([0.0, 0.1, 0.9, 1.0], [0, 0, 1, 1])
    assert m["image_auroc"] == 1.0 and m["image_ap"] == pytest.approx(1.0) and m["image_f1max"] == pytest.approx(1.0)


def test_large_scores_need_rescaling_before_anomalib_auroc():
    """torchmetrics' ROC (under anomalib's AUROC) sigmoids inputs outside [0, 1]; float32 sigmoid
    of 20..40 is 1.0 for all, so raw kNN distances would score 0.5. Our wrapper rescales first."""
    from anomalib.metrics import AUROC

    s, y = torch.tensor([20.0, 30.0, 25.0, 40.0]), torch.tensor([0, 1, 0, 1])
    raw = em._anomalib(AUROC, s, y)
    assert raw == pytest.approx(0.5)  # the pitfall, shown
    assert em.image_metrics(s, y)["image_auroc"] == pytest.approx(1.0) == roc_auc_score(y, s)


def test_one_class_labels_give_none():
    assert em.image_metrics([0.1, 0.2], [0, 0]) == dict.fromkeys(em.IMAGE_METRICS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.8 * y, 1) * 7.0 + 3.0  # ties, values far outside [0, 1]
    m = em.image_metrics(s, y)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert m["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    p = np.array([((s >= t) & (y == 1)).sum() / max(1, (s >= t).sum()) for t in np.unique(s)])
    r = np.array([((s >= t) & (y == 1)).sum() / y.sum() for t in np.unique(s)])
    assert m["image_f1max"] == pytest.approx(np.max(2 * p * r / (p + r + 1e-12)), abs=1e-5)


def _pixel_case():
    # two 1x4 images; regions: R1 = image0 pixels 0,1 (size 2), R2 = image1 pixel 3 (size 1)
    maps = np.array([[[0.9, 0.5, 0.6, 0.1]], [[0.2, 0.3, 0.4, 0.7]]], np.float32)
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]]], bool)
    return maps, masks


def test_pixel_metrics_hand_computed():
    maps, masks = _pixel_case()
    # pixel AUROC: positives 0.9, 0.7, 0.5 vs negatives 0.6 0.4 0.3 0.2 0.1 -> 5 + 5 + 4 of 15
    # PRO curve, thresholds descending: 0.9 -> (fpr 0, pro 1/4); 0.7 -> (0, 3/4); 0.6 -> (1/5, 3/4);
    #   0.5 -> (1/5, 1); then fpr 2/5.. with pro 1. Up to fpr 0.3: area 0.2*0.75 + 0.1*1 = 0.25,
    #   normalised by 0.3 -> 5/6. Up to fpr 1: 0.15 + 0.8 = 0.95.
    # F1-max: threshold 0.5 -> P = 3/4, R = 1 -> 6/7
    m = em.pixel_metrics(maps, masks, fpr_limit=0.3)
    assert m["pixel_auroc"] == pytest.approx(14 / 15)
    assert m["pixel_aupro"] == pytest.approx(5 / 6, abs=1e-6)
    assert m["pixel_f1max"] == pytest.approx(6 / 7, abs=1e-6)
    assert em.pixel_metrics(maps, masks, fpr_limit=1.0)["pixel_aupro"] == pytest.approx(0.95, abs=1e-6)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pixel_metrics_scale_invariant_and_degenerate():
    maps, masks = _pixel_case()
    a = em.pixel_metrics(maps, masks)
    b = em.pixel_metrics(maps * 50 + 10, masks)  # distances, not probabilities
    assert a == pytest.approx(b)
    assert em.pixel_metrics(maps, np.zeros_like(masks)) == dict.fromkeys(em.PIXEL_METRICS)


def test_compute_metrics_uses_only_images_with_known_masks():
    maps, masks = _pixel_case()
    # a third, defective image without a mask: its map must not enter the pixel metrics
    maps3 = np.concatenate([maps, np.full((1, 1, 4), 0.0, np.float32)])
    masks3 = np.concatenate([masks, np.zeros((1, 1, 4), bool)])
    m = em.compute_metrics([0.9, 0.7, 0.8], [1, 1, 1 - 1], maps3, masks3, pixel_known=[True, True, False])
    assert m["pixel_auroc"] == pytest.approx(14 / 15)
    no_pix = em.compute_metrics([0.1, 0.9], [0, 1])
    assert no_pix["image_auroc"] == 1.0 and no_pix["pixel_auroc"] is None


# ---------------------------------------------------------------------------- data


def _texture(rng, size=64):
    base = rng.normal(128, 12, (size, size)).clip(0, 255).astype(np.uint8)
    return np.repeat(base[..., None], 3, axis=2)


def _defect(rng, size=64):
    img = _texture(rng, size)
    mask = np.zeros((size, size), np.uint8)
    y, x = rng.integers(8, size - 24, 2)
    mask[y:y + 14, x:x + 14] = 1
    img[mask > 0] = 250
    return img, mask


def make_class(root: Path, seed: int = 0, n_train=6, n_good=5, n_bad=5, masks=True, extra_unmasked=0):
    rng = np.random.default_rng(seed)
    defects = {"spot": [_defect(rng) for _ in range(n_bad)]}
    if not masks:
        defects = {"spot": [(img, None) for img, _ in defects["spot"]]}
    if extra_unmasked:
        defects["blur"] = [(_defect(rng)[0], None) for _ in range(extra_unmasked)]
    return write_mvtec(root, [_texture(rng) for _ in range(n_train)], [_texture(rng) for _ in range(n_good)], defects)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    make_class(root / "alpha", seed=0)
    make_class(root / "beta", seed=1, masks=False)
    make_class(root / "gamma", seed=2, extra_unmasked=3)
    return root


def test_find_classes_root_and_single(dataset):
    cs = ed.find_classes(dataset)
    assert [c.name for c in cs] == ["alpha", "beta", "gamma"]
    a, b, g = cs
    assert a.has_masks and not b.has_masks and g.has_masks
    assert g.unmasked_types == ["blur"] and g.masked_types == ["spot"]
    assert a.describe()["test_good"] == 5 and a.describe()["test_defect"] == 5
    single = ed.find_classes(dataset / "alpha")
    assert len(single) == 1 and single[0].name == "alpha"
    assert [c.name for c in ed.find_classes(dataset, ["beta"])] == ["beta"]
    with pytest.raises(FileNotFoundError):
        ed.find_classes(dataset, ["nope"])
    with pytest.raises(FileNotFoundError):
        ed.find_classes(dataset / "alpha" / "ground_truth")


def test_masks_and_test_set(dataset):
    from inspector.backbones.registry import Preprocess

    g = ed.find_classes(dataset, ["gamma"])[0]
    ts = ed.load_test_set(g, Preprocess(32, (0.5,) * 3, (0.25,) * 3))
    assert ts.x.shape == (len(ts), 3, 32, 32)
    assert ts.labels.tolist() == [0] * 5 + [1] * 3 + [1] * 5  # good, blur (sorted), spot
    assert ts.pixel_known.tolist() == [True] * 5 + [False] * 3 + [True] * 5
    m = ts.masks((32, 32))
    assert m.dtype == bool and m[-5:].any(axis=(1, 2)).all() and not m[:8].any()
    assert ts.rgb[0].shape == (32, 32, 3)


def test_draw_shots_seeded():
    assert ed.draw_shots(10, 4, 0) == ed.draw_shots(10, 4, 0)
    assert not set(ed.draw_shots(10, 4, 0)) & set(ed.draw_shots(10, 4, 1))  # disjoint across seeds
    assert len({tuple(ed.draw_shots(16, 1, s)) for s in range(16)}) == 16
    assert ed.draw_shots(10, 4, 2) != ed.draw_shots(10, 4, 0)  # beyond n // k blocks: a new permutation
    assert len(set(ed.draw_shots(10, 10, 3))) == 10
    with pytest.raises(ValueError, match="only 3"):
        ed.draw_shots(3, 4, 0)


# ---------------------------------------------------------------------------- stand-in scorer


class StandIn:
    """Test-only few-shot scorer: per-pixel distance to the mean of the shots (preprocessed input)."""

    name: ClassVar[str] = "standin"
    needs_fit: ClassVar[bool] = True
    batchwise: ClassVar[bool] = False

    def __init__(self, backbone, noise: float = 0.0):
        self.backbone = backbone
        self.noise = noise

    def fit(self, images):
        self.mean = images.mean(0)
        return self

    def score(self, images):
        from inspector.detectors.base import AnomalyResult
        from inspector.detectors.ops import gaussian_blur, top_mean

        maps = gaussian_blur((images - self.mean).abs().mean(1), 1.0)
        if self.noise:
            maps = maps + self.noise * torch.rand_like(maps)
        return AnomalyResult(maps, top_mean(maps))


class EmbeddingStandIn(StandIn):
    """Same scores as StandIn, via the embed / score_embeddings split (GraphCore's)."""

    name: ClassVar[str] = "emb-standin"
    embed_calls: ClassVar[int] = 0

    def embed(self, images):
        EmbeddingStandIn.embed_calls += len(images)
        return images

    def score_embeddings(self, feats, size):
        return StandIn.score(self, feats)

    def score(self, images):
        return self.score_embeddings(self.embed(images), tuple(images.shape[-2:]))


class ZeroShotStandIn(StandIn):
    name: ClassVar[str] = "zs-standin"
    needs_fit: ClassVar[bool] = False
    batchwise: ClassVar[bool] = True

    def score(self, images):
        self.mean = images.median(0).values  # mutual: compares images of the batch with each other
        return super().score(images)


class NoWeights(StandIn):
    name: ClassVar[str] = "noweights"

    def __init__(self, backbone, **kw):
        from inspector.backbones.registry import MissingWeightsError

        raise MissingWeightsError("prompt checkpoint missing: place models/anomalyclip/prompts.safetensors")


class Crashes(StandIn):
    name: ClassVar[str] = "crashes"

    def score(self, images):
        raise RuntimeError("boom")


def test_evaluate_protocols_end_to_end(dataset, tmp_path, tiny_cnn):
    cfg = ev.EvalConfig(detectors=[StandIn, ZeroShotStandIn, NoWeights, Crashes], shots=(1, 2), seeds=(0, 1),
                        backbone="tiny-cnn", device="cpu", classes=["alpha", "gamma"], batch_size=4)
    lines = []
    rep = ev.evaluate(dataset, cfg, out_dir=tmp_path / "plots", log=lines.append)
    by = {(r.cls, r.detector, r.shots, r.seed): r for r in rep.runs}
    # few-shot grid: 2 classes x 2 k x 2 seeds; zero-shot: one run per class
    assert sum(r.detector == "standin" for r in rep.runs) == 8
    assert sum(r.detector == "zs-standin" for r in rep.runs) == 2
    r = by[("alpha", "standin", 2, 1)]
    assert r.status == "ok" and r.protocol == "few-shot" and len(r.shot_indices) == 2
    assert r.metrics["image_auroc"] == pytest.approx(1.0) and r.metrics["pixel_auroc"] > 0.9
    assert r.n_test == 10 and r.n_pixel_images == 10
    assert r.detector_ms > 0 and r.backbone_ms > 0 and r.fit_s is not None and r.mem_kind == "cpu_rss"
    g = by[("gamma", "standin", 1, 0)]
    assert g.n_test == 13 and g.n_pixel_images == 10  # the 3 unmasked "blur" images are image-level only
    assert set(g.per_type_auroc) == {"blur", "spot"} and g.per_type_auroc["spot"] == pytest.approx(1.0)
    z = by[("alpha", "zs-standin", None, None)]
    assert z.status == "ok" and z.protocol == "zero-shot" and z.fit_s is None
    nw = by[("alpha", "noweights", 1, 0)]
    assert nw.status == "skipped" and "prompt checkpoint missing" in nw.reason
    cr = by[("alpha", "crashes", 1, 0)]
    assert cr.status == "failed" and cr.reason == "RuntimeError: boom"
    # plots: first seed only
    pngs = sorted(p.name for p in (tmp_path / "plots" / "alpha").glob("*.png"))
    assert pngs == ["standin-k1_curves.png", "standin-k1_examples.png", "standin-k2_curves.png",
                    "standin-k2_examples.png", "zs-standin_curves.png", "zs-standin_examples.png"]
    assert (tmp_path / "plots" / "alpha" / "standin-k1_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any("skipped" in s for s in lines)

    summary = rep.summary()
    mean = next(s for s in summary if s["detector"] == "standin" and s["shots"] == 1 and s["class"] == "mean")
    runs = [x for x in rep.runs if x.detector == "standin" and x.shots == 1]
    per_seed = [np.mean([x.metrics["pixel_aupro"] for x in runs if x.seed == s]) for s in (0, 1)]
    assert mean["pixel_aupro"] == pytest.approx(np.mean(per_seed))
    assert mean["pixel_aupro_std"] == pytest.approx(np.std(per_seed, ddof=1))
    skipped = [s for s in summary if s["detector"] == "noweights"]  # one row for all classes and k
    assert len(skipped) == 1 and skipped[0]["class"] == "all"
    assert skipped[0]["status"] == "skipped" and skipped[0]["image_auroc"] is None

    js = json.loads(json.dumps(rep.to_json()))  # strict JSON: no NaN
    assert js["config"]["detectors"] == ["standin", "zs-standin", "noweights", "crashes"]
    assert {c["name"] for c in js["classes"]} == {"alpha", "gamma"}
    assert len(js["runs"]) == len(rep.runs) and js["environment"]["device"] == "cpu"
    md = et.markdown_table(summary)
    assert md.count("\n") == len(summary) + 1 and "prompt checkpoint missing" in md
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(et.rich_table(summary))
    assert "I-AUROC" in console.export_text()


def test_image_only_class_reports_image_metrics(dataset, tiny_cnn):
    cfg = ev.EvalConfig(detectors=[StandIn], shots=(2,), seeds=(0,), backbone="tiny-cnn", device="cpu",
                        classes=["beta"], plots=False)
    (r,) = ev.evaluate(dataset, cfg).runs
    assert r.status == "ok" and r.metrics["image_auroc"] is not None
    assert all(r.metrics[k] is None for k in em.PIXEL_METRICS) and r.n_pixel_images == 0


def test_too_many_shots_is_skipped_not_fatal(dataset, tiny_cnn):
    cfg = ev.EvalConfig(detectors=[StandIn], shots=(2, 8), seeds=(0,), backbone="tiny-cnn", device="cpu",
                        classes=["alpha"], plots=False)
    runs = {r.shots: r for r in ev.evaluate(dataset, cfg).runs}
    assert runs[2].status == "ok"
    assert runs[8].status == "skipped" and "only 6" in runs[8].reason


def test_peak_memory_sees_an_allocation():
    with me.PeakMemory("cpu") as mem:
        x = np.ones(64 * 2**20, np.uint8)  # 64 MB, touched
        x[::4096] = 2
        from conftest import wait_for

        # the sampler thread sees it while it exists (a fixed sleep may pass unscheduled on a busy machine)
        wait_for(lambda: mem.peak - mem.base > 40 * 2**20, 30, "the RSS sampler to see the 64 MB allocation",
                 step=0.002)
        del x
    assert mem.rise_mb > 40 and mem.kind == "cpu_rss"


def test_cli_eval(dataset, tmp_path, monkeypatch, tiny_cnn, capsys):
    from inspector.cli.main import main
    from inspector.detectors import registry

    monkeypatch.setitem(registry.DETECTORS, "standin", f"{__name__}:StandIn")
    out_json = tmp_path / "r.json"
    rc = main(["eval", "--data", str(dataset / "alpha"), "--detector", "standin", "--shots", "1",
               "--seeds", "0", "1", "--backbone", "tiny-cnn", "--device", "cpu", "--out", str(tmp_path / "o"),
               "--json", str(out_json), "--set", "standin.noise=0.001"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "I-AUROC" in text and "standin" in text
    js = json.loads(out_json.read_text())
    assert js["config"]["detector_config"] == {"standin": {"noise": 0.001}}
    assert len(js["runs"]) == 2 and js["summary"][0]["image_auroc"] == pytest.approx(1.0)
    assert (tmp_path / "o" / "alpha" / "standin-k1_examples.png").is_file()
    assert main(["eval", "--data", str(tmp_path / "missing"), "--detector", "standin"]) == 1
    assert main(["eval", "--data", str(dataset), "--detector", "nonexistent", "--no-plots",
                 "--backbone", "tiny-cnn", "--device", "cpu"]) == 1


@pytest.mark.slow
def test_lite0_weights_map_onto_timm_for_anomalib_patchcore():
    """The anomalib PatchCore baseline runs on timm's tf_efficientnet_lite0 carrying inspector's
    Lite0 weights: the renamed state dict loads strictly and gives identical logits."""
    import timm

    from inspector.backbones.efficientnet import lite0_weights_path, load_lite0_classifier
    from inspector.detectors.baselines import lite0_timm_state_dict

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(lite0_timm_state_dict(state), strict=True)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net(x), load_lite0_classifier()(x), atol=1e-4)


def test_fit_independent_embeddings_are_computed_once_per_class(dataset, tiny_cnn):
    cfg = ev.EvalConfig(detectors=[StandIn, EmbeddingStandIn], shots=(1, 2), seeds=(0, 1), backbone="tiny-cnn",
                        device="cpu", classes=["alpha"], plots=False)
    EmbeddingStandIn.embed_calls = 0
    runs = ev.evaluate(dataset, cfg).runs
    plain = {(r.shots, r.seed): r for r in runs if r.detector == "standin"}
    emb = {(r.shots, r.seed): r for r in runs if r.detector == "emb-standin"}
    assert EmbeddingStandIn.embed_calls == 10  # the 10 test images, once, not 4 runs x 10
    assert [r.embed_cached for r in emb.values()] == [False, True, True, True]
    for key, r in emb.items():
        assert r.metrics == pytest.approx(plain[key].metrics)
        assert r.detector_ms > 0
