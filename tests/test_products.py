"""Product registry: registration (fit + held-out calibration), persistence across processes,
updates, deletion, audit trail, crash safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import deadline, random_crops

from inspector.io import write_image
from inspector.products import registry as products_mod
from inspector.products.calibration import N_VIEWS
from inspector.products.product import ProductExists, ProductNotFound, RuntimeUnavailable
from inspector.station.service import StationService
from inspector.verdict import Thresholds, Verdict, calibrate

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def station(tmp_path_factory):
    return StationService(tmp_path_factory.mktemp("products") / "data", device="cpu")


def test_register_then_new_process_gives_the_same_score(station, brick, tmp_path):
    shots = random_crops(brick, 2)
    prod = station.registry.register("brick-gc", shots, detector="graphcore", backbone="tiny-cnn", image_size=64,
                                     n_synthetic=4, actor="eng")
    test_img = np.ascontiguousarray(brick[200:300, 150:290])  # non-square: 100 x 140
    ins = prod.inspect([test_img])[0]
    assert ins.map.shape == (100, 140) and ins.map.dtype == np.float32  # at the original size
    assert ins.verdict == prod.thresholds.decide(ins.score)
    path = write_image(tmp_path / "test.png", test_img)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "inspector", "inspect", str(path), "--product", "brick-gc",
                          "--data-dir", str(station.data_dir), "--json", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=deadline(180), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["score"] == pytest.approx(ins.score, rel=1e-6, abs=1e-9)
    assert rec["verdict"] == ins.verdict.value
    assert rec["model_version"] == prod.version
    assert Path(rec["heatmap"]).is_file()
    row = station.store.get(rec["id"])  # the other process recorded it in the same store
    assert row["score"] == pytest.approx(ins.score, rel=1e-6, abs=1e-9) and row["product"] == "brick-gc"


def test_calibration_uses_held_out_scores_and_generated_defects(station, brick):
    k, n_syn = 3, 5
    prod = station.registry.register("brick-cal", random_crops(brick, k, seed=1), detector="patchcore",
                                     backbone="tiny-cnn", image_size=64, n_synthetic=n_syn)
    cal = prod.calibration
    assert len(cal["normal_scores"]) == k * (1 + N_VIEWS)  # leave-one-out shot + views, per fold
    assert len(cal["defect_scores"]) == n_syn
    assert min(cal["normal_scores"]) > 0  # held out: not the memory bank's own patches
    assert prod.thresholds == calibrate(cal["normal_scores"], cal["defect_scores"])
    assert cal["auto_thresholds"] == prod.thresholds.to_dict()
    single = station.registry.register("brick-one", random_crops(brick, 1, seed=2), detector="patchcore",
                                       backbone="tiny-cnn", image_size=64, n_synthetic=2)
    assert len(single.calibration["normal_scores"]) == N_VIEWS and min(single.calibration["normal_scores"]) > 0


def test_update_thresholds_add_shots_delete_with_audit(station, brick):
    reg = station.registry
    prod = reg.register("life", random_crops(brick, 2, seed=3), detector="patchcore", backbone="tiny-cnn",
                        image_size=64, n_synthetic=2, actor="eng")
    state = prod.path / f"state-{prod.model_hash}.safetensors"
    mtime = state.stat().st_mtime_ns
    img = random_crops(brick, 1, seed=4)[0]
    before = prod.inspect(img)[0].score

    new = reg.set_thresholds("life", Thresholds(before * 2, before * 3), actor="qa")
    assert new.model_hash == prod.model_hash and new.version != prod.version  # no refit, new version
    assert state.stat().st_mtime_ns == mtime
    again = new.inspect(img)[0]
    assert again.score == pytest.approx(before, rel=1e-6) and again.verdict is Verdict.OK

    grown = reg.add_shots("life", random_crops(brick, 1, seed=5), actor="eng")
    assert grown.shots == 3 and len(grown.shot_files) == 3 and grown.model_hash != prod.model_hash
    assert state.exists()  # kept: the earlier versions still refer to it (rollback is instant)
    with pytest.raises(ValueError, match="already registered"):
        reg.add_shots("life", random_crops(brick, 1, seed=5))

    assert "life" in [p.name for p in reg.list()]
    reg.delete("life", actor="eng")
    with pytest.raises(ProductNotFound, match="unknown product 'life'"):
        reg.get("life")
    actions = [a["action"] for a in station.store.audit_log("life")]
    assert actions == ["delete", "add_shots", "set_thresholds", "register"]
    thr = station.store.audit_log("life")[2]
    assert thr["actor"] == "qa" and thr["details"]["thresholds"]["ok_below"] == pytest.approx(before * 2)


def test_a_crash_during_an_update_leaves_the_old_product(station, brick, monkeypatch):
    reg = station.registry
    prod = reg.register("crashy", random_crops(brick, 2, seed=6), detector="patchcore", backbone="tiny-cnn",
                        image_size=64, n_synthetic=2)
    img = random_crops(brick, 1, seed=7)[0]
    score = prod.inspect(img)[0].score
    real = products_mod.atomic_write_json

    def dying(path, obj):
        if Path(path).name == "product.json":
            raise OSError("power cut")
        return real(path, obj)

    monkeypatch.setattr(products_mod, "atomic_write_json", dying)
    with pytest.raises(OSError, match="power cut"):
        reg.add_shots("crashy", random_crops(brick, 1, seed=8))
    monkeypatch.undo()
    reg._runtimes.clear()  # as a fresh process would
    same = reg.get("crashy")
    assert same.version == prod.version and same.shots == 2
    assert same.inspect(img)[0].score == pytest.approx(score, rel=1e-6)


def test_musc_product_scores_with_its_reference_shots(station, brick):
    prod = station.registry.register("brick-musc", random_crops(brick, 3, seed=9), detector="musc", backbone="tiny-cnn",
                                     image_size=64, n_synthetic=3)
    assert prod.registration["mode"] == "mutual"
    imgs = random_crops(brick, 2, seed=10)
    res = prod.inspect(imgs)
    assert len(res) == 2 and all(np.isfinite(r.score) for r in res) and res[0].map.shape == (96, 96)
    # one at a time gives the same as together: each image is scored only with the references
    assert prod.inspect(imgs[1])[0].score == pytest.approx(res[1].score, rel=1e-5)
    with pytest.raises(RuntimeUnavailable, match="cannot run as an ONNX graph"):
        prod.inspect(imgs, runtime="onnx")


def test_registration_errors_are_clear(station, brick):
    reg = station.registry
    with pytest.raises(ValueError, match="invalid product name"):
        reg.register("../evil", random_crops(brick, 1), backbone="tiny-cnn")
    with pytest.raises(ValueError, match="at least one"):
        reg.register("empty", [], backbone="tiny-cnn")
    reg.register("dup", random_crops(brick, 1), detector="patchcore", backbone="tiny-cnn", image_size=64, n_synthetic=1)
    with pytest.raises(ProductExists):
        reg.register("dup", random_crops(brick, 1), detector="patchcore", backbone="tiny-cnn", image_size=64)
    with pytest.raises(KeyError, match="unknown detector"):
        reg.register("nodet", random_crops(brick, 1), detector="nope", backbone="tiny-cnn")
    assert not reg.exists("nodet")


def test_cli_register_products_and_history(station, brick, tmp_path, capsys):
    from inspector.cli.main import main

    d = ["--data-dir", str(station.data_dir)]
    shots = [write_image(tmp_path / f"s{i}.png", im) for i, im in enumerate(random_crops(brick, 2, seed=11))]
    assert main(["register", "cli-p", str(tmp_path), "--detector", "patchcore", "--backbone", "tiny-cnn",
                 "--image-size", "64", "--n-synthetic", "2", "--actor", "eng", *d]) == 0
    assert "registered cli-p: patchcore on tiny-cnn @ 64px, 2 shot(s)" in capsys.readouterr().out
    assert main(["register", "cli-p", str(shots[0]), "--backbone", "tiny-cnn", *d]) == 1  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["register", "bad", str(tmp_path / "missing.png"), *d]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["products", "list", "--json", *d]) == 0
    assert "cli-p" in {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert main(["products", "set-thresholds", "cli-p", "--ok-below", "1", "--ng-above", "2", *d]) == 0
    assert station.registry.get("cli-p").thresholds == Thresholds(1.0, 2.0)
    assert main(["products", "set-thresholds", "cli-p", "--ok-below", "3", *d]) == 1  # 3 > ng_above 2
    assert "must not exceed" in capsys.readouterr().err
    assert main(["products", "set-thresholds", "cli-p", "--auto", *d]) == 0
    prod = station.registry.get("cli-p")
    assert prod.thresholds.to_dict() == prod.calibration["auto_thresholds"]
    assert main(["products", "show", "cli-p", *d]) == 0
    out = capsys.readouterr().out
    assert "set_thresholds" in out and "held-out normal scores" in out
    assert main(["inspect", str(shots[0]), "--product", "cli-p", *d]) == 0
    assert main(["history", "--product", "cli-p", "--json", *d]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["source"] == str(shots[0])
    assert main(["products", "delete", "cli-p", "--yes", *d]) == 0
    assert main(["products", "show", "cli-p", *d]) == 1
    capsys.readouterr()
    assert main(["products", "audit", "cli-p", "--json", *d]) == 0
    actions = [a["action"] for a in json.loads(capsys.readouterr().out)]
    assert actions == ["delete", "set_thresholds", "set_thresholds", "register"]


def test_graphcore_registration_trains_its_head_once(station, brick, monkeypatch):
    """The held-out folds refit the bank without their shot but reuse the final model's head:
    one head training per registration, not one per fold (5x the time at 4 shots)."""
    from inspector.detectors.graphcore import selection
    from inspector.detectors.graphcore.detector import GraphCore

    trained, reused = [], []
    real_train, real_fit = selection.train_head, GraphCore.fit

    def counting_train(*a, **kw):
        trained.append(1)
        return real_train(*a, **kw)

    def recording_fit(self, images, **kw):
        out = real_fit(self, images, **kw)
        reused.append((int(images.shape[0]), kw.get("reuse_head_of") is not None))
        return out

    monkeypatch.setattr(selection, "train_head", counting_train)
    monkeypatch.setattr(GraphCore, "fit", recording_fit)
    prod = station.registry.register("brick-gc-once", random_crops(brick, 3), detector="graphcore",
                                     backbone="tiny-cnn", image_size=64, n_synthetic=3, actor="eng",
                                     detector_config={"head": True, "train_steps": 5, "train_defects": 4})
    assert len(trained) == 1
    assert reused == [(3, False), (2, True), (2, True), (2, True)]  # final on all shots, then 3 folds
    assert prod.registration["selection"]["enabled"]["head"]  # the decision is recorded with the product


def test_reused_head_is_refused_across_configs(brick):
    import torch

    from inspector.backbones.registry import load_backbone
    from inspector.detectors.graphcore.detector import GraphCore

    bb = load_backbone("tiny-cnn", device="cpu", image_size=64)
    x = bb.preprocess(random_crops(brick, 2))
    donor = GraphCore(bb, head=True, train_steps=2, train_defects=2).fit(x)
    with pytest.raises(ValueError, match="same class and config"):
        GraphCore(bb, head=True, train_steps=3, train_defects=2).fit(x, reuse_head_of=donor)
    fold = GraphCore(bb, head=True, train_steps=2, train_defects=2).fit(x[:1], reuse_head_of=donor)
    assert fold.scorer.head is donor.scorer.head and fold.fit_info["head"]["reused"]
    assert not torch.equal(fold.scorer.memory, donor.scorer.memory) or fold.scorer.memory.shape != donor.scorer.memory.shape
