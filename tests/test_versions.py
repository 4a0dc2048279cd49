"""Product versions and refit: immutable versions, promote / rollback / shadow with audit rows,
NAME@VERSION scoring, evidence reaching the next version (bank, reference set, thresholds), and a
refit killed with SIGKILL that leaves the active version as it was and no orphan files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import deadline, random_crops, wait_for

from inspector.io import write_image
from inspector.products.feedback.evidence import LabeledImage
from inspector.products.product import ProductNotFound
from inspector.products.registry import ProductRegistry
from inspector.state import array_sha256
from inspector.station.service import StationService
from inspector.verdict import Verdict

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(backbone="tiny-cnn", image_size=64, n_synthetic=3)


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    st = StationService(tmp_path_factory.mktemp("versions") / "data", device="cpu")
    yield st
    st.close()


def odd_parts(brick, n: int, seed: int = 5) -> list[np.ndarray]:
    """Brick crops under a much harsher light: normal parts a 2-3 shot product flags."""
    return [np.ascontiguousarray(np.clip(c.astype(np.int16) * 1.6 - 60, 0, 255).astype(np.uint8))
            for c in random_crops(brick, n, seed=seed)]


def scratched(img: np.ndarray, dy: int = 0) -> np.ndarray:
    """A dark scratch across the part (``dy`` moves it: a near-identical defect)."""
    out = img.copy()
    out[30 + dy:40 + dy, 10:86] = 5
    return out


def labeled(images: list[np.ndarray], label: str) -> list[LabeledImage]:
    return [LabeledImage(im, label, array_sha256(im)) for im in images]


def files_of(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def _flagged(prod, parts) -> np.ndarray:
    """The first part the product does not pass as OK."""
    for ins, im in zip(prod.inspect(parts), parts):
        if ins.verdict is not Verdict.OK:
            return im
    pytest.fail("no part is flagged by the product: the test has nothing to confirm")


def test_versions_promote_rollback_and_audit(station, brick):
    reg = station.registry
    v1 = reg.register("life-v", random_crops(brick, 2, seed=1), detector="patchcore", actor="eng", **TINY)
    assert [v["version"] for v in reg.versions("life-v")] == [v1.version]
    out = reg.refit("life-v", labeled(odd_parts(brick, 2), "normal") + labeled(
        [scratched(c) for c in random_crops(brick, 3, seed=2)], "defect"), actor="qa")
    cand = out["version"]
    assert out["parent"] == v1.version and not out["promoted"] and out["evidence"] == {"normal": 2, "defect": 3}
    for side in ("before", "after"):
        t = out["table"][side]
        assert (t["n_normal"], t["n_defect"]) == (2, 3) and 0 <= t["auroc"] <= 1
        assert 0 <= t["false_alarm_rate"] <= 1 and 0 <= t["missed_rate"] <= 1
    assert reg.get("life-v").version == v1.version  # not promoted: the active version is untouched
    vs = reg.versions("life-v")
    assert [v["version"] for v in vs] == [cand, v1.version]  # newest first
    assert [(v["action"], v["active"], v["actor"]) for v in vs] == [("refit", False, "qa"), ("register", True, "eng")]
    assert vs[0]["parent"] == v1.version and vs[0]["evidence"] == {"normal": 2, "defect": 3}
    rec = json.loads((v1.path / "versions" / f"{cand}.json").read_text())  # evidence used, per item
    assert sorted(i["label"] for i in rec["origin"]["evidence"]["items"]) == ["defect"] * 3 + ["normal"] * 2

    assert reg.promote("life-v", cand[:8], actor="lead").version == cand  # a unique prefix names it
    assert reg.get("life-v").version == cand
    assert reg.rollback("life-v", actor="lead").version == v1.version
    assert reg.rollback("life-v").version == cand  # undoes the rollback
    assert [h["action"] for h in reg.history("life-v")] == ["register", "promote", "rollback", "rollback"]
    raw = json.loads((v1.path / "product.json").read_text())
    assert raw["version"] == cand and raw["history"][1]["actor"] == "lead"
    audit = station.store.audit_log("life-v")
    assert [a["action"] for a in audit] == ["rollback", "rollback", "promote", "refit", "register"]
    assert audit[2]["details"] == {"version": cand, "previous_version": v1.version}
    assert audit[3]["actor"] == "qa" and audit[3]["details"]["evidence"] == {"normal": 2, "defect": 3}
    with pytest.raises(ProductNotFound, match="does not exist"):
        reg.get("life-v@ffffffffffff")


def test_rollback_restores_byte_identical_scores(station, brick):
    reg = station.registry
    reg.register("roll", random_crops(brick, 2, seed=3), detector="patchcore", **TINY)
    parts = random_crops(brick, 3, seed=4) + odd_parts(brick, 2, seed=6)
    before = reg.get("roll").inspect(parts)
    reg.refit("roll", labeled(odd_parts(brick, 2, seed=6), "normal"), promote=True)
    changed = reg.get("roll").inspect(parts)
    assert any(a.score != b.score for a, b in zip(before, changed))
    reg.rollback("roll")
    for r in (reg, ProductRegistry(reg.root)):  # the cached model, and one loaded afresh from disk
        after = r.get("roll").inspect(parts)
        assert [a.score for a in after] == [b.score for b in before]
        assert all(a.map.tobytes() == b.map.tobytes() and a.verdict is b.verdict for a, b in zip(after, before))


@pytest.mark.parametrize("detector", ["patchcore", "musc"])
def test_an_accepted_ng_enters_the_next_version_and_then_scores_ok(station, brick, detector):
    """A false alarm the operator accepts is a confirmed normal: in the next version's bank
    (PatchCore) or reference set (MuSc), so the same part then scores OK."""
    reg = station.registry
    name = f"fa-{detector}"
    prod = reg.register(name, random_crops(brick, 3, seed=0), detector=detector, **TINY)
    part = _flagged(prod, odd_parts(brick, 4, seed=5))
    first = prod.inspect(part)[0]
    out = reg.refit(name, labeled([part], "normal"), promote=True)
    new = reg.get(name)
    assert new.version == out["version"] != prod.version
    again = new.inspect(part)[0]
    assert again.verdict is Verdict.OK and again.score < first.score
    assert out["table"]["before"]["false_alarm_rate"] == 1.0  # it was a false alarm
    if detector == "musc":
        assert len(new.reference_files) == 1 and new.reference_files[0].startswith("refs/")
        assert (new.path / new.reference_files[0]).is_file()
    # its held-out score (scored without it) went into the normal side of the calibration
    assert new.calibration["evidence_normal_scores"] and new.calibration["evidence_normal_scores"][0] > again.score


def test_a_rejected_part_raises_the_score_of_a_near_identical_defect(station, brick):
    """Confirmed defects switch on what GraphCore's rule finds separates them (learned head,
    views or global branch, chosen on the evidence, held out): defects next to the rejected ones
    then score higher against the version's own normal scale than in a version refitted on the
    same confirmed normals without the rejections. The thresholds are left out of the measure on
    purpose. (The real backbone: the tiny test CNN's random features do not see these defects.)"""
    reg = station.registry
    reg.register("rej", random_crops(brick, 3, seed=11), detector="graphcore", backbone="efficientnet-lite0",
                 image_size=96, n_synthetic=3,
                 detector_config={"train_steps": 30, "train_defects": 8, "candidate_views": 2})
    crops = random_crops(brick, 11, seed=12)
    rejected = labeled([scratched(c, dy) for c, dy in zip(crops[:6], (0, 4, 8, 12, 16, 20))], "defect")
    probes = [scratched(c, dy) for c, dy in zip(crops[8:], (2, 10, 14))]
    normals = labeled(random_crops(brick, 3, seed=13), "normal")

    def against_normals(out) -> float:
        p = reg.get("rej", out["version"])
        scale = max(p.calibration["normal_scores"] + p.calibration["evidence_normal_scores"])
        return float(np.mean([i.score for i in p.inspect(probes)]) / scale)

    without = reg.refit("rej", normals)
    with_rejections = reg.refit("rej", normals + rejected)
    assert with_rejections["selection"]["evidence"] == {"normals": 3, "defects": 6}
    assert any(with_rejections["selection"]["enabled"].values()), with_rejections["selection"]["reason"]
    assert not any(without["selection"]["enabled"].values())  # no defects: the rule switches nothing on
    assert against_normals(with_rejections) > against_normals(without)
    assert reg.get("rej", with_rejections["version"]).registration["selection"] == with_rejections["selection"]


def test_a_zero_shot_product_only_recalibrates(station, brick):
    """Nothing is learned by a zero-shot model (AnomalyCLIP on the tiny random CLIP): the refit
    keeps its state and re-sets the thresholds from the evidence's scores."""
    reg = station.registry
    prod = reg.register("zero", random_crops(brick, 2, seed=80), detector="anomalyclip", backbone="clip/tiny",
                        n_synthetic=3)
    assert prod.registration["mode"] == "zero"
    ev = labeled(odd_parts(brick, 2, seed=81), "normal") + labeled(
        [scratched(c) for c in random_crops(brick, 3, seed=82)], "defect")
    out = reg.refit("zero", ev)
    cand = reg.get("zero", out["version"])
    assert cand.model_hash == prod.model_hash and cand.version != prod.version
    assert out["table"]["before"]["auroc"] == out["table"]["after"]["auroc"]  # the same scores
    assert cand.calibration["evidence_defect_scores"] == pytest.approx(
        [i.score for i in prod.inspect([it.image for it in ev[2:]])], rel=1e-5)


def test_name_at_version_scores_with_that_version(station, brick, tmp_path, capsys):
    from inspector.cli.main import main

    reg = station.registry
    prod = reg.register("pin", random_crops(brick, 3, seed=0), detector="patchcore", **TINY)
    part = _flagged(prod, odd_parts(brick, 4, seed=5))
    cand = reg.refit("pin", labeled([part], "normal"))["version"]
    assert reg.get("pin").version == prod.version
    pinned = reg.get(f"pin@{cand}")
    assert pinned.version == cand and pinned.name == "pin" and reg.get("pin", version=cand).version == cand
    s_active, s_cand = reg.get("pin").inspect(part)[0].score, pinned.inspect(part)[0].score
    assert s_cand < s_active
    # both models are served side by side (active + candidate), each by its own model hash
    assert reg.runtime(reg.get("pin")) is not reg.runtime(pinned)
    assert reg.get("pin").inspect(part)[0].score == s_active

    rec = station.inspect(f"pin@{cand}", part)
    assert rec.model_version == cand and rec.product == "pin" and rec.score == pytest.approx(s_cand, rel=1e-6)
    d = ["--data-dir", str(station.data_dir)]
    path = write_image(tmp_path / "part.png", part)
    assert main(["inspect", str(path), "--product", f"pin@{cand}", "--json", *d]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["model_version"] == cand and row["score"] == pytest.approx(s_cand, rel=1e-5)
    folder = tmp_path / "batch"
    folder.mkdir()
    write_image(folder / "a.png", part)
    assert main(["batch", str(folder), "--product", f"pin@{cand}", "--no-progress", "--heatmaps", "none", *d]) == 0
    capsys.readouterr()
    rows = [r for r in station.store.history(product="pin") if r["source"].endswith("a.png")]
    assert rows and {r["model_version"] for r in rows} == {cand}
    assert main(["inspect", str(path), "--product", "pin@0000000000", *d]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_shadow_candidate(station, brick):
    reg = station.registry
    prod = reg.register("shady", random_crops(brick, 2, seed=20), detector="patchcore", **TINY)
    cand = reg.refit("shady", labeled(odd_parts(brick, 1, seed=21), "normal"))["version"]
    assert reg.shadow_version("shady") is None
    with pytest.raises(ValueError, match="active version"):
        reg.set_shadow("shady", prod.version)
    assert reg.set_shadow("shady", cand[:6], actor="eng") == cand
    assert reg.shadow_version("shady") == cand and reg.get("shady").version == prod.version
    assert [v["shadow"] for v in reg.versions("shady")] == [True, False]
    reg.promote("shady", cand)
    assert reg.shadow_version("shady") is None  # promoted: the shadow run is over
    actions = [a["action"] for a in station.store.audit_log("shady")]
    assert actions == ["promote", "set_shadow", "refit", "register"]


def test_a_product_from_before_versions_loads_and_keeps_its_version(station, brick):
    reg = station.registry
    prod = reg.register("legacy", random_crops(brick, 2, seed=30), detector="patchcore", **TINY)
    part = random_crops(brick, 1, seed=31)[0]
    score = prod.inspect(part)[0].score
    d = prod.path
    raw = json.loads((d / "product.json").read_text())
    for k in ("history", "shadow", "parent", "reference_files", "origin"):
        raw.pop(k)
    (d / "product.json").write_text(json.dumps(raw))  # as the previous code wrote it
    for f in (d / "versions").iterdir():
        f.unlink()
    (d / "versions").rmdir()
    fresh = ProductRegistry(reg.root)
    assert not [p for p in fresh.cleaned if d in p.parents] and fresh.get("legacy").version == prod.version
    assert [(v["version"], v["active"]) for v in fresh.versions("legacy")] == [(prod.version, True)]
    new = fresh.set_thresholds("legacy", (score * 0.5, score * 0.8))
    assert (d / "versions" / f"{prod.version}.json").is_file()  # its first change kept the old record
    assert fresh.get("legacy").decide(score) is Verdict.NG
    assert fresh.rollback("legacy").version == prod.version and new.version != prod.version
    assert fresh.get("legacy").inspect(part)[0].score == score


def test_open_removes_what_no_version_refers_to(station, brick):
    reg = station.registry
    prod = reg.register("tidy", random_crops(brick, 2, seed=40), detector="patchcore", **TINY)
    d = prod.path
    keep = files_of(d)
    (d / "state-0123456789abcdef.safetensors").write_bytes(b"orphan")
    (d / "versions" / ".abc.json.x1.tmp").write_text("{")
    (d / "refs").mkdir(exist_ok=True)
    (d / "refs" / "0123456789abcdef.png").write_bytes(b"orphan")
    half = reg.root / "half-registered"
    (half / "shots").mkdir(parents=True)
    (half / "state-0123.json").write_text("{}")
    cleaned = ProductRegistry(reg.root).cleaned
    assert files_of(d) == keep and not half.exists()
    assert {p.name for p in cleaned} >= {"state-0123456789abcdef.safetensors", ".abc.json.x1.tmp", "half-registered"}


CHILD = """
import sys, threading, torch
from pathlib import Path
torch.set_num_threads(1)
from inspector.io import read_image
from inspector.products.feedback.evidence import LabeledImage
from inspector.products.registry import ProductRegistry
from inspector.state import array_sha256

root, name, marker, stage, step = sys.argv[1:6]
items = []
for arg in sys.argv[6:]:
    label, path = arg.split("=", 1)
    img = read_image(path)
    items.append(LabeledImage(img, label, array_sha256(img)))

def progress(s, done, total):
    if s == stage and done == int(step):
        Path(marker).write_text(f"{s} {done}/{total}")
        threading.Event().wait()  # the test kills this process here

ProductRegistry(root).refit(name, items, progress=progress, promote=True)
print("refit finished: the kill came too late")
"""


@pytest.mark.parametrize("stage,step", [("save", 1), ("evidence", 1)])
def test_kill_9_during_refit_leaves_the_active_version_and_no_orphans(station, brick, tmp_path, stage, step):
    """SIGKILL at a moment of the refit (``save 1``: the candidate's state files are written, its
    version file and product.json are not; ``evidence``: mid computation): the active version is
    byte-for-byte the same, and the next registry open leaves exactly the files of before."""
    reg = station.registry
    name = f"kill-{stage}"
    prod = reg.register(name, random_crops(brick, 2, seed=50), detector="patchcore", **TINY)
    part = odd_parts(brick, 1, seed=51)[0]
    score = prod.inspect(part)[0].score
    d = prod.path
    product_json = (d / "product.json").read_bytes()
    files = files_of(d)
    args = [f"normal={write_image(tmp_path / 'n.png', part)}",
            f"defect={write_image(tmp_path / 'd.png', scratched(random_crops(brick, 1, seed=52)[0]))}"]
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(reg.root), name, str(marker), stage, str(step), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def at_kill_point() -> bool:
            assert proc.poll() is None, f"refit ended before the kill: {proc.communicate()}"
            return marker.exists()

        wait_for(at_kill_point, 300, "the refit to reach the kill point")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=deadline(30))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    if stage == "save":
        assert len(files_of(d) - files) == 2  # the candidate's state files were on disk
    fresh = ProductRegistry(reg.root)
    assert (d / "product.json").read_bytes() == product_json
    assert files_of(d) == files
    assert fresh.get(name).version == prod.version and [v["version"] for v in fresh.versions(name)] == [prod.version]
    assert fresh.get(name).inspect(part)[0].score == score


def test_cli_refit_versions_promote_rollback(station, brick, capsys):
    """The station's decisions are the evidence `inspector refit` learns from."""
    from inspector.cli.main import main

    d = ["--data-dir", str(station.data_dir)]
    prod = station.registry.register("cli-v", random_crops(brick, 2, seed=60), detector="patchcore", **TINY)
    for im in odd_parts(brick, 2, seed=61):
        rec = station.inspect("cli-v", im)
        station.decide(rec.id, "accept", "op", reason="false-alarm")
    for c in random_crops(brick, 3, seed=62):
        station.decide(station.inspect("cli-v", scratched(c)).id, "reject", "op", reason="scratch")
    assert main(["refit", "cli-v", "--no-progress", "--actor", "eng", *d]) == 0
    out = capsys.readouterr().out
    cand = station.registry.versions("cli-v")[0]["version"]
    assert f"candidate version {cand} from {prod.version}" in out and "2 confirmed normal(s)" in out
    assert "3 confirmed defect(s)" in out and "image AUROC" in out and "missed defects" in out
    assert station.registry.get("cli-v").version == prod.version
    assert main(["versions", "cli-v", *d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"  {cand}") and "refit" in lines[0] and lines[1].startswith(f"* {prod.version}")
    assert main(["promote", "cli-v", cand, "--actor", "lead", *d]) == 0
    assert f"version {cand} is now active" in capsys.readouterr().out
    assert main(["products", "show", "cli-v", *d]) == 0
    assert f"made by refit from {prod.version}" in capsys.readouterr().out
    assert main(["rollback", "cli-v", *d]) == 0
    assert f"to version {prod.version}" in capsys.readouterr().out
    assert main(["refit", "cli-v", "--promote", "--json", *d]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["promoted"] and station.registry.get("cli-v").version == res["version"]
    assert [a["action"] for a in station.store.audit_log("cli-v")][:4] == ["refit", "rollback", "promote", "refit"]


def test_before_scores_reuse_what_the_active_version_recorded(station, brick, monkeypatch):
    """The *before* column needs the active version's score of each piece of evidence: the
    station recorded it when that version made the verdict, so only evidence decided under
    another version is scored again."""
    reg = station.registry
    reg.register("reuse", random_crops(brick, 2, seed=70), detector="patchcore", **TINY)
    recs = [station.inspect("reuse", im) for im in odd_parts(brick, 2, seed=71)]
    for r in recs:
        station.decide(r.id, "accept", "op", reason="false-alarm")
    scored: list[int] = []
    real = ProductRegistry._score_items

    def counting(self, prod, images, chunk=8):
        scored.append(len(images))
        return real(self, prod, images, chunk)

    monkeypatch.setattr(ProductRegistry, "_score_items", counting)
    out = station.refit("reuse", promote=True)
    assert scored == [] and out["evidence"] == {"normal": 2, "defect": 0}
    rec = json.loads((reg.get("reuse").path / "versions" / f"{out['version']}.json").read_text())
    assert sorted(rec["origin"]["before_scores"]["normal"]) == sorted(r.score for r in recs)
    # the evidence was decided under the previous version: now it is scored by the active one
    station.decide(station.inspect("reuse", scratched(random_crops(brick, 1, seed=72)[0])).id, "reject", "op",
                   reason="scratch")
    station.refit("reuse")
    assert scored == [2]
