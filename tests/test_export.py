"""ONNX export + onnxruntime runner: parity with the torch path, dynamic batch, clear errors.

Parity (fp32, CPU): maps and image scores within 1e-4 absolute of the torch path, verdicts
identical, for every exportable detector with its default scoring configuration.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inspector.deploy.export import (
    NotExportableError,
    export_backbone,
    export_detector,
    read_sidecar,
    scoring_module,
)
from inspector.deploy.onnx import OnnxRunner
from inspector.deploy.runtime import load_runtime
from inspector.verdict import Thresholds, Verdict

pytestmark = pytest.mark.slow


def crops(brick: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two normal shots and three test images (normal, bright-square defect, non-square normal)."""
    shots = [brick[:256, :256].copy(), brick[256:, 256:].copy()]
    defect = brick[256:, :256].copy()
    defect[100:150, 90:140] = (250, 240, 40)
    tests = [brick[:256, 256:].copy(), defect, brick[60:260, 150:450].copy()]
    return shots, tests


def assert_parity(got, ref, what: str) -> None:
    gm, rm = np.asarray(got.maps), np.asarray(ref.maps)
    gs, rs = np.asarray(got.scores), np.asarray(ref.scores)
    assert gm.shape == rm.shape and gs.shape == rs.shape
    map_err, score_err = np.abs(gm - rm).max(), np.abs(gs - rs).max()
    print(f"{what}: max|map diff| {map_err:.2e} (map scale {np.abs(rm).max():.3g}), max|score diff| {score_err:.2e}")
    assert map_err <= 1e-4, f"{what}: maps differ by {map_err}"
    assert score_err <= 1e-4, f"{what}: scores differ by {score_err}"


def verdicts(scores, th: Thresholds) -> list[Verdict]:
    return [th.decide(float(s)) for s in np.asarray(scores)]


# -- backbone ------------------------------------------------------------------------------------


def test_backbone_export_parity_dynamic_batch_and_sidecar(lite0, brick, tmp_path):
    res = export_backbone(lite0, tmp_path / "lite0.onnx", verify=False)
    run = OnnxRunner(res.onnx_path, device="cpu")
    _, tests = crops(brick)
    ref = lite0.embed(lite0.preprocess(tests))
    for batch in (tests, tests[:1]):  # exported once, run at batch 3 and batch 1
        got = run.features(batch)
        assert list(got) == list(lite0.layers)
        for k in lite0.layers:
            np.testing.assert_allclose(got[k], ref[k][: len(batch)].numpy(), atol=1e-4, rtol=0)

    meta = read_sidecar(res.onnx_path)
    assert meta["kind"] == "backbone" and meta["backbone"] == "efficientnet-lite0"
    assert {k: meta["preprocess"][k] for k in ("size", "mean", "std")} == lite0.preprocess.to_dict()
    assert meta["preprocess"]["resize"]["shrink"].startswith("INTER_AREA")
    assert meta["input"]["shape"] == ["batch", 3, 128, 128]
    assert {"inspector", "torch", "onnx", "opset"} <= set(meta["versions"])
    assert run.preprocess == lite0.preprocess  # the very same preprocessing object, rebuilt

    import onnx

    model = onnx.load(str(res.onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 128, 128]
    assert {"Conv", "Pad"} <= {n.op_type for n in model.graph.node}  # TF "SAME": pads fixed by the size


# -- detectors -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(request, lite0, brick):
    from inspector.detectors.graphcore.detector import GraphCore, PatchCoreKNN

    shots, tests = crops(brick)
    if request.param == "graphcore":  # head + global branch (off by default: on here explicitly); a short training
        det = GraphCore(lite0, head=True, global_branch=True, views=2, train_steps=10, train_defects=4,
                        train_normals=2)
    else:
        det = PatchCoreKNN(lite0, reduce="max")  # the other image-score reduction
    det.fit(lite0.preprocess(shots))
    return det, tests


@pytest.mark.parametrize("fitted", ["patchcore", "graphcore"], indirect=True)
def test_memory_bank_detectors_export_with_parity(fitted, tmp_path):
    det, tests = fitted
    x = det.backbone.preprocess(tests)
    ref = det.score(x)
    lo, hi = float(ref.scores.min()), float(ref.scores.max())
    th = Thresholds(lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo))
    verify = det.name == "patchcore"  # the export-time check itself is covered once
    res = export_detector(det, tmp_path / f"{det.name}.onnx", thresholds=th, product="brick", product_version="v1",
                          verify=verify)
    if verify:
        assert res.parity["maps_ratio"] <= 1.0 and res.parity["reference"].startswith(f"{det.name}.score()")

    run = OnnxRunner(res.onnx_path, device="cpu")
    assert run.thresholds == th and run.detector_name == det.name and run.device == "cpu"
    got = run.score(tests)  # raw RGB images through the sidecar's Preprocess
    assert_parity(got, ref, f"{det.name} batch 3")
    assert verdicts(got.scores, th) == verdicts(ref.scores, th)
    one = run.score(tests[1:2])  # dynamic batch: the same graph at batch 1
    assert_parity(one, type(ref)(ref.maps[1:2], ref.scores[1:2]), f"{det.name} batch 1")
    assert float(ref.scores[1]) == max(ref.scores.tolist())  # the defect scores highest (sanity)

    inspections = run.inspect(tests)
    for im, ins, s in zip(tests, inspections, ref.scores.tolist()):
        assert ins.map.shape == im.shape[:2] and ins.map.dtype == np.float32
        assert ins.verdict == th.decide(s) and abs(ins.score - s) <= 1e-4


def test_anomalyclip_exports_with_text_embeddings_as_constants(tmp_path):
    import onnx

    from inspector.backbones.registry import load_backbone
    from inspector.detectors.anomalyclip.detector import AnomalyCLIP

    bb = load_backbone("clip/tiny", device="cpu")
    det = AnomalyCLIP(bb)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (80, 96, 3), dtype=np.uint8) for _ in range(3)]
    ref = det.score(bb.preprocess(images))
    res = export_detector(det, tmp_path / "aclip.onnx", verify=False)
    run = OnnxRunner(res.onnx_path, device="cpu")
    assert_parity(run.score(images), ref, "anomalyclip batch 3")
    assert_parity(run.score(images[2:]), type(ref)(ref.maps[2:], ref.scores[2:]), "anomalyclip batch 1")
    # No text tower in the graph: its token embedding table (vocab 49408 x 32) is not a constant.
    from onnx import numpy_helper

    model = onnx.load(str(res.onnx_path))
    consts = [tuple(t.dims) for t in model.graph.initializer]
    consts += [numpy_helper.to_array(a.t).shape for n in model.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"]
    assert not any(49408 in shape for shape in consts)
    assert (32, 2) in consts or (2, 32) in consts  # the normal/abnormal text embeddings


def test_musc_is_not_exportable_with_a_clear_error(tiny_cnn):
    from inspector.detectors.musc.detector import MuSc

    with pytest.raises(NotExportableError, match="not exportable.*mutual scoring") as err:
        scoring_module(MuSc(tiny_cnn))
    assert "inspector export --backbone tiny-cnn" in str(err.value)  # what can be exported instead
    # A registered MuSc product fails the same way, before any model is loaded.
    from types import SimpleNamespace

    from inspector.deploy.export import export_product

    prod = SimpleNamespace(name="p", detector="musc", backbone="tiny-cnn", load_detector=None)
    with pytest.raises(NotExportableError, match="not exportable"):
        export_product(prod, "unused.onnx")


def test_unknown_detector_and_unfitted_detector_are_refused(lite0):
    from inspector.detectors.graphcore.detector import GraphCore

    class Other:
        name, batchwise, backbone = "other", False, lite0

        def score(self, images):  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(NotExportableError, match="no ONNX export"):
        scoring_module(Other())
    with pytest.raises(NotExportableError, match="not fitted"):
        export_detector(GraphCore(lite0), "unused.onnx")


# -- runner, products, CLI ----------------------------------------------------------------------


def test_runner_refuses_a_modified_model_file(tiny_cnn, tmp_path):
    res = export_backbone(tiny_cnn, tmp_path / "t.onnx")
    data = bytearray(res.onnx_path.read_bytes())
    data[-1] ^= 0xFF
    res.onnx_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        OnnxRunner(res.onnx_path)
    with pytest.raises(FileNotFoundError, match="sidecar"):
        res.sidecar_path.unlink()
        OnnxRunner(res.onnx_path)


def test_cuda_request_without_gpu_build_says_how_to_install(monkeypatch):
    from inspector.deploy import onnx as rt

    monkeypatch.setattr(rt, "available_providers", lambda: ["CPUExecutionProvider"])
    assert rt.select_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="uninstall -y onnxruntime"):
        rt.select_providers("cuda")


def test_product_onnx_runtime_matches_torch_and_cli_export(brick, tmp_path, capsys):
    from inspector.cli.main import main
    from inspector.station.service import StationService

    station = StationService(tmp_path / "data")
    shots, tests = crops(brick)
    # tiny-cnn keeps registration (fit + calibration) short; Lite0 parity is covered above.
    prod = station.registry.register("brick", shots, detector="patchcore", backbone="tiny-cnn",
                                     image_size=64, n_synthetic=4)
    torch_res = prod.inspect(tests, runtime="torch")
    onnx_res = prod.inspect(tests, runtime="onnx")  # exported on first use into the product folder
    assert (prod.path / "model.onnx").is_file()
    for a, b in zip(torch_res, onnx_res):
        assert a.verdict == b.verdict and abs(a.score - b.score) <= 1e-4
        assert a.map.shape == b.map.shape
        assert np.abs(b.map - a.map).max() <= 1e-4
    graph_file = prod.path / "model.onnx"
    stamp = graph_file.stat().st_mtime_ns
    new_th = Thresholds(prod.thresholds.ok_below * 0.5, prod.thresholds.ng_above * 2)
    prod = station.registry.set_thresholds("brick", new_th)
    runner = load_runtime(prod, "onnx", registry=station.registry)  # thresholds changed, model did not
    assert runner.meta["model_hash"] == prod.model_hash and runner.thresholds == new_th
    assert graph_file.stat().st_mtime_ns == stamp  # no re-export for a threshold change

    out = tmp_path / "models" / "brick.onnx"
    assert main(["export", "--product", "brick", "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["product"] == "brick" and meta["product_version"] == prod.version
    assert meta["thresholds"] == prod.thresholds.to_dict() and meta["detector"] == "patchcore"
    assert "parity" in capsys.readouterr().out


def test_cli_backbone_export_and_bad_output_name(tmp_path, capsys):
    from inspector.cli.main import main

    out = tmp_path / "tiny.onnx"
    assert main(["export", "--backbone", "tiny-cnn", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert main(["export", "--backbone", "tiny-cnn", "--out", str(tmp_path / "x.txt")]) == 1
    assert "must end in .onnx" in capsys.readouterr().err


def test_export_does_not_touch_the_live_detector(fitted_patchcore_cpu, tmp_path):
    det = fitted_patchcore_cpu
    before = det.memory.clone()
    export_detector(det, tmp_path / "p.onnx", verify=False)
    assert torch.equal(det.memory, before) and det.backbone.device.type == "cpu"
    assert not getattr(det.backbone, "fp32", False)


@pytest.fixture
def fitted_patchcore_cpu(tiny_cnn, brick):
    from inspector.detectors.graphcore.detector import PatchCoreKNN

    shots, _ = crops(brick)
    return PatchCoreKNN(tiny_cnn).fit(tiny_cnn.preprocess(shots))
