"""Operator feedback as evidence: the decision -> evidence rule, the reason code for accepting an
NG part, painted masks, and ``inspector feedback import|show`` (a malformed CSV imports nothing)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import random_crops

from inspector.io import write_image
from inspector.products.feedback.evidence import EvidenceItem, evidence_label, item_from_row, latest_per_image

PRODUCT = "brick-fb"


@pytest.fixture(scope="module")
def template(tmp_path_factory, brick):
    """A registered tiny product (PatchCore on the tiny CNN at 64 px, two shots), copied per test."""
    from inspector.station.service import StationService

    root = tmp_path_factory.mktemp("feedback-template")
    st = StationService(root / "data", device="cpu")
    st.registry.register(PRODUCT, random_crops(brick, 2, 96, seed=0), detector="patchcore", backbone="tiny-cnn",
                         image_size=64, n_synthetic=2, actor="test")
    st.close()
    return root / "data" / "products"


@pytest.fixture
def station(tmp_path, template):
    from inspector.station.service import StationService

    shutil.copytree(template, tmp_path / "data" / "products")
    st = StationService(tmp_path / "data", device="cpu")
    yield st
    st.close()


def _scratched(img: np.ndarray) -> np.ndarray:
    img = img.copy()
    img[40:46, 10:80] = 20
    return img


@pytest.fixture
def images(tmp_path, brick):
    """Six 96 px brick crops on disk, the odd ones with a dark scratch."""
    out = []
    for i, img in enumerate(random_crops(brick, 6, 96, seed=3)):
        out.append(write_image(tmp_path / "imgs" / f"part{i}.png", _scratched(img) if i % 2 else img))
    return out


def _always_ng(station):
    """Make every verdict NG (a new version whose NG threshold is below every score)."""
    station.registry.set_thresholds(PRODUCT, (-1.0, -1.0), actor="test")


# -- the rule --------------------------------------------------------------------------------------
def test_decision_to_evidence_rule():
    assert evidence_label("NG", "accept") == "normal"  # a false alarm
    assert evidence_label("UNCERTAIN", "accept") == "normal"
    assert evidence_label("OK", "accept") == "normal"
    for v in ("OK", "UNCERTAIN", "NG"):
        assert evidence_label(v, "reject") == "defect"
    assert evidence_label("ERROR", "reject") is None  # never scored: nothing to learn from
    assert evidence_label("NG", None) is None
    row = {"image_sha256": "a" * 64, "verdict": "NG", "decision": "accept", "source": "s", "inspection_id": 3,
           "decision_id": 7, "model_version": "v1", "score": 2.5, "operator": "ann", "reason": "false-alarm"}
    it = item_from_row(row)
    assert (it.label, it.sha256, it.version, it.inspection_id, it.decision_id) == ("normal", "a" * 64, "v1", 3, 7)
    assert item_from_row({**row, "image_sha256": None}) is None
    # one image inspected twice: the most recent decision on either inspection labels it
    a = EvidenceItem("a" * 64, "defect", "s", inspection_id=1, decision_id=5)
    b = EvidenceItem("a" * 64, "normal", "s", inspection_id=2, decision_id=9)
    c = EvidenceItem("c" * 64, "defect", "t", inspection_id=3, decision_id=6)
    assert latest_per_image([b, a, c]) == [c, b]


def test_later_decision_replaces_earlier_and_trail_stays(station, images):
    rec = station.inspect(PRODUCT, images[1], source="cam")
    row = station.store.get(rec.id)
    first = station.decide(rec.id, "reject", "ann", expect_latest=None)
    ev = station.evidence(PRODUCT)
    assert [(e.label, e.inspection_id, e.decision_id, e.sha256) for e in ev] == [
        ("defect", rec.id, first["id"], row["image_sha256"])]
    assert station.evidence_images.is_kept(row["image_sha256"])  # a decided image never rolls over
    second = station.decide(rec.id, "accept", "bob", reason="false-alarm", expect_latest=first["id"])
    ev = station.evidence(PRODUCT)
    assert [(e.label, e.decision_id, e.operator, e.version) for e in ev] == [
        ("normal", second["id"], "bob", rec.model_version)]
    assert [d["decision"] for d in station.store.decisions(rec.id)] == ["reject", "accept"]  # the trail stays
    # the same part inspected again and rejected: still one piece of evidence, labelled by the latest
    again = station.inspect(PRODUCT, images[1], source="cam")
    station.decide(again.id, "reject", "cyd")
    ev = station.evidence(PRODUCT)
    assert len(ev) == 1 and ev[0].label == "defect" and ev[0].inspection_id == again.id


def test_accepting_an_ng_part_needs_a_reason(station, images):
    _always_ng(station)
    rec = station.inspect(PRODUCT, images[0])
    assert str(rec.verdict) == "NG"
    sha = station.store.get(rec.id)["image_sha256"]
    assert station.evidence_images.has(sha) and not station.evidence_images.is_kept(sha)
    with pytest.raises(ValueError, match="accepting an NG part needs a reason code"):
        station.decide(rec.id, "accept", "ann")
    assert station.store.decisions(rec.id) == [] and station.evidence(PRODUCT) == []
    assert not station.evidence_images.is_kept(sha)  # refused before anything was kept
    station.decide(rec.id, "accept", "ann", reason="false-alarm")
    assert [e.label for e in station.evidence(PRODUCT)] == ["normal"]
    assert station.evidence_images.is_kept(sha)
    other = station.inspect(PRODUCT, images[1])
    station.decide(other.id, "reject", "ann")  # rejecting needs none


def test_mask_is_stored_with_a_rejection(station, images):
    rec = station.inspect(PRODUCT, images[1])
    mask = np.zeros((96, 96), bool)
    mask[40:46, 10:80] = True
    with pytest.raises(ValueError, match="rejection"):
        station.decide(rec.id, "accept", "ann", reason="false-alarm", mask=mask)
    with pytest.raises(ValueError, match="HxW"):
        station.decide(rec.id, "reject", "ann", mask=np.zeros(5, bool))
    d = station.decide(rec.id, "reject", "ann", reason="scratch", mask=mask.astype(np.uint8) * 255)
    assert d["mask_sha256"] and station.store.decisions(rec.id)[-1]["mask_sha256"] == d["mask_sha256"]
    assert np.array_equal(station.evidence_images.read_mask(d["mask_sha256"]), mask)
    assert station.evidence_images.is_kept(d["mask_sha256"])
    (ev,) = station.evidence(PRODUCT)
    assert ev.mask_sha256 == d["mask_sha256"] and ev.reason == "scratch"
    ok = station.inspect(PRODUCT, images[0])
    assert station.decide(ok.id, "accept", "ann", reason="false-alarm", mask=np.zeros((96, 96), bool))[
        "mask_sha256"] is None  # nothing painted: no mask


# -- import ----------------------------------------------------------------------------------------
def _csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_rejects_a_malformed_csv_with_its_line_and_imports_nothing(station, images, tmp_path, capsys):
    from inspector.cli.main import main

    d = images[0].parent
    (d / "notes.txt").write_text("not an image")
    small = np.zeros((10, 10), np.uint8)
    write_image(d / "small-mask.png", np.repeat(small[..., None], 3, 2))
    good = ["path,label", "part0.png,good", "part1.png,defect"]
    cases = {
        "bad label": (good + ["part2.png,maybe"], 4, "label must be good or defect"),
        "missing file": (good + ["part3.png,good", "nope.png,good"], 5, "nope.png"),
        "not an image": (good + ["notes.txt,defect"], 4, "notes.txt"),
        "twice": (good + ["part0.png,defect"], 4, "listed twice (first on line 2)"),
        "mask on good": (["path,label,mask", "part0.png,good,small-mask.png"], 2, "only for a defect"),
        "mask size": (["path,label,mask", "part0.png,good,", "part1.png,defect,small-mask.png"], 3, "10x10"),
        "fields": (good + ["part2.png,good,extra"], 4, "3 field(s)"),
        "header": (["file,label", "part0.png,good"], 1, "header"),
        "empty path": (good + [",good"], 4, "empty path"),
    }
    for name, (lines, line, what) in cases.items():
        f = _csv(d / f"{name.replace(' ', '-')}.csv", lines)
        with pytest.raises(ValueError, match=rf"line {line}: .*{re.escape(what)}") as err:
            station.import_feedback(PRODUCT, f, actor="qa")
        assert "nothing was imported" in str(err.value), name
        assert station.store.count() == 0, name  # not one row, not one inspection
        assert station.evidence_images.usage()["files"] == 0, name
    with pytest.raises(ValueError, match="no rows"):
        station.import_feedback(PRODUCT, _csv(d / "empty.csv", ["path,label"]), actor="qa")
    # the command line says the same and exits non-zero
    data = str(station.data_dir)
    assert main(["feedback", "import", PRODUCT, str(d / "bad-label.csv"), "--data-dir", data, "--no-progress"]) == 1
    assert "line 4" in capsys.readouterr().err
    assert station.store.count() == 0


def test_import_then_show_counts(station, images, tmp_path, capsys):
    from inspector.cli.main import main

    d = images[0].parent
    mask = np.zeros((96, 96), np.uint8)
    mask[40:46, 10:80] = 255
    write_image(d / "masks" / "part1.png", np.repeat(mask[..., None], 3, 2))
    f = _csv(tmp_path / "qa.csv", [  # relative to the CSV's folder, or absolute; blank lines allowed
        "path,label,operator,reason,mask",
        "imgs/part0.png,good,lab-ann,,",
        "imgs/part1.png,DEFECT,lab-ann,scratch,imgs/masks/part1.png",
        "",
        "imgs/part2.png,good,,,",
        f"{images[3]},defect,,dent,",
        "imgs/part4.png,good,,,",
    ])
    calls = []
    out = station.import_feedback(PRODUCT, f, actor="qa", progress=lambda done, total: calls.append((done, total)))
    assert out["imported"] == out["rows"] == 5 and out["labels"] == {"normal": 3, "defect": 2}
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)
    assert sum(out["verdicts"].values()) == 5
    rows = {r["id"]: r for r in station.store.history(limit=None)}
    assert set(out["inspection_ids"]) == set(rows)
    assert all(r["source"].startswith("import:") and r["source"].endswith(".png") for r in rows.values())
    ev = station.evidence(PRODUCT)
    assert sorted((e.source.rsplit("/", 1)[-1], e.label) for e in ev) == [
        ("part0.png", "normal"), ("part1.png", "defect"), ("part2.png", "normal"), ("part3.png", "defect"),
        ("part4.png", "normal")]
    by = {e.source.rsplit("/", 1)[-1]: e for e in ev}
    assert by["part0.png"].operator == "lab-ann" and by["part2.png"].operator == "qa"
    assert by["part1.png"].reason == "scratch" and by["part3.png"].reason == "dent"
    assert np.array_equal(station.evidence_images.read_mask(by["part1.png"].mask_sha256), mask > 0)
    assert all(station.evidence_images.is_kept(e.sha256) for e in ev)
    version = station.registry.get(PRODUCT).version
    s = station.feedback_summary(PRODUCT)
    assert s["labels"] == {"normal": 3, "defect": 2} and s["total"] == 5 and s["with_mask"] == 1
    assert s["by_version"] == {version: {"normal": 3, "defect": 2}} and s["active_version"] == version
    assert s["since_active"] == {"normal": 3, "defect": 2} and s["images_missing"] == 0
    assert station.store.audit_log(PRODUCT, limit=1)[0]["action"] == "feedback-import"
    # the command line: show, then one more import through it
    data = str(station.data_dir)
    assert main(["feedback", "show", PRODUCT, "--data-dir", data, "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["labels"] == {"normal": 3, "defect": 2}
    f2 = _csv(tmp_path / "more.csv", ["path,label", "imgs/part5.png,defect"])
    assert main(["feedback", "import", PRODUCT, str(f2), "--data-dir", data, "--actor", "eve", "--no-progress"]) == 0
    assert "imported 1 labelled part" in capsys.readouterr().out
    assert main(["feedback", "show", PRODUCT, "--data-dir", data]) == 0
    shown = capsys.readouterr().out
    assert version[:8] in shown and "(active)" in shown
    assert station.feedback_summary(PRODUCT)["labels"] == {"normal": 3, "defect": 3}


def test_import_of_a_good_part_the_model_called_ng_gets_a_reason(station, images, tmp_path):
    _always_ng(station)
    f = _csv(tmp_path / "qa.csv", ["path,label", f"{images[0]},good", f"{images[1]},good"])
    out = station.import_feedback(PRODUCT, f, actor="qa")
    assert out["verdicts"] == {"NG": 2} and out["model_agreed"] == 0
    assert {e.reason for e in station.evidence(PRODUCT)} == {"false-alarm"}


def test_refit_loads_the_evidence(station, images, tmp_path):
    f = _csv(tmp_path / "qa.csv", ["path,label"] + [f"{p},{'defect' if i % 2 else 'good'}"
                                                    for i, p in enumerate(images)])
    station.import_feedback(PRODUCT, f, actor="qa")
    before = station.registry.get(PRODUCT).version
    out = station.refit(PRODUCT, actor="eng")
    assert out["evidence"] == {"normal": 3, "defect": 3} and out["skipped_missing"] == 0
    assert out["parent"] == before and out["version"] != before and not out["promoted"]
    assert station.registry.get(PRODUCT).version == before  # a candidate, not active
    assert out["version"] in [v["version"] for v in station.versions(PRODUCT)]
    # an image lost from the evidence store is skipped and counted; a promoted refit uses the rest
    lost = station.evidence(PRODUCT)[0]
    station.evidence_images.path(lost.sha256).unlink()
    again = station.refit(PRODUCT, actor="eng", promote=True)
    assert again["skipped_missing"] == 1 and sum(again["evidence"].values()) == 5 and again["promoted"]
    s = station.feedback_summary(PRODUCT)
    assert s["active_version"] == again["version"] and s["images_missing"] == 1
    assert s["total"] == 6 and s["since_active"] == {"normal": 0, "defect": 0}  # all decided before it was made
