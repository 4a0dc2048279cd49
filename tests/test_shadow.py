"""Shadow mode: a candidate version scores every part beside the active one without changing what
the station records or returns; both verdicts are stored and tallied; a busy worker drops parts
instead of slowing the caller."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import deadline, random_crops

from inspector.io import write_image
from inspector.verdict import Thresholds

PRODUCT = "brick-shadow"


@pytest.fixture(scope="module")
def template(tmp_path_factory, brick):
    """A tiny product (PatchCore, tiny CNN, 64 px) with a second version: the same model with
    thresholds at the median score of the test parts, so that the candidate agrees on some parts
    and not on others. Returns (products folder, active version, candidate version, thresholds)."""
    from inspector.station.service import StationService

    root = tmp_path_factory.mktemp("shadow-template")
    st = StationService(root / "data", device="cpu")
    prod = st.registry.register(PRODUCT, random_crops(brick, 2, 96, seed=0), detector="patchcore",
                                backbone="tiny-cnn", image_size=64, n_synthetic=2, actor="test")
    scores = [r.score for r in st.registry.inspect(prod, _parts(brick))]
    mid = float(np.median(scores))
    cand = st.registry.set_thresholds(PRODUCT, (mid, mid), actor="test").version  # becomes active...
    st.registry.rollback(PRODUCT, actor="test")  # ...and back: the first version is active again
    assert st.registry.get(PRODUCT).version == prod.version != cand
    st.close()
    return root / "data" / "products", prod.version, cand, Thresholds(mid, mid)


def _parts(brick) -> list[np.ndarray]:
    out = []
    for i, img in enumerate(random_crops(brick, 8, 96, seed=5)):
        if i % 2:
            img = img.copy()
            img[30 + i:36 + i, 10:70] = 15
        out.append(img)
    return out


@pytest.fixture
def make_station(tmp_path, template):
    from inspector.station.service import StationService

    made = []

    def make(name: str, **kw):
        shutil.copytree(template[0], tmp_path / name / "products")
        st = StationService(tmp_path / name, device="cpu", **kw)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def _row(st, iid: int) -> dict:
    r = st.store.get(iid)
    return {k: r[k] for k in ("product", "source", "image_sha256", "score", "verdict", "model_version", "error",
                              "batch_id", "decision")}


def _same_record(a, b) -> None:
    assert (a.product, a.source, a.score, a.verdict, a.model_version, a.error, a.thresholds) == (
        b.product, b.source, b.score, b.verdict, b.model_version, b.error, b.thresholds)
    assert np.array_equal(a.map, b.map) and np.array_equal(a.overlay, b.overlay) and np.array_equal(a.image, b.image)
    assert (a.heatmap_path is None) == (b.heatmap_path is None)


def test_shadow_never_changes_a_verdict_and_tallies_both(make_station, template, brick):
    _, active, cand, cand_thr = template
    parts = _parts(brick)
    plain = make_station("plain")
    shadowed = make_station("shadowed")
    assert shadowed.set_shadow(PRODUCT, cand, actor="eng") == cand
    assert plain.registry.shadow_version(PRODUCT) is None
    recs = []
    for i, img in enumerate(parts):
        a = plain.inspect(PRODUCT, img, source=f"part{i}")
        b = shadowed.inspect(PRODUCT, img, source=f"part{i}")
        _same_record(a, b)  # what the caller gets back
        assert _row(plain, a.id) == _row(shadowed, b.id)  # what was recorded
        recs.append(b)
    assert shadowed.shadow.wait_idle(timeout=deadline(120))
    assert plain.store.shadow_tally(PRODUCT, cand)["scored"] == 0  # no shadow, no second scoring
    # the candidate's results: same model, so the same scores, judged by its own thresholds
    expect = {}
    for r in recs:
        (sr,) = shadowed.store.shadow_rows(r.id)
        assert sr["version"] == cand and sr["error"] is None
        assert sr["score"] == pytest.approx(r.score, rel=1e-5, abs=1e-6)
        assert sr["verdict"] == str(cand_thr.decide(r.score))
        expect[r.id] = (str(r.verdict), sr["verdict"])
        assert _row(shadowed, r.id)["verdict"] == str(r.verdict)  # the active verdict still stands
    n_agree = sum(a == c for a, c in expect.values())
    assert 0 < n_agree < len(parts), expect  # the fixture's thresholds make both happen
    # operators settle who was right: reject the scratched parts, accept the others
    for i, r in enumerate(recs):
        shadowed.decide(r.id, "reject" if i % 2 else "accept", "ann", reason="false-alarm")
    t = shadowed.shadow_tally(PRODUCT)
    assert t["version"] == cand and t["scored"] == len(parts) and t["dropped"] == t["failed"] == 0
    assert (t["agree"], t["disagree"]) == (n_agree, len(parts) - n_agree)
    flagged = {iid: (a != "OK", c != "OK") for iid, (a, c) in expect.items()}
    defect = {r.id: bool(i % 2) for i, r in enumerate(recs)}
    assert t["decided"] == len(parts)
    assert t["candidate_right"] == sum(flagged[i][1] == defect[i] for i in defect)
    assert t["active_right"] == sum(flagged[i][0] == defect[i] for i in defect)
    assert t["false_alarms_avoided"] == sum(not defect[i] and flagged[i][0] and not flagged[i][1] for i in defect)
    assert t["defects_missed"] == sum(defect[i] and flagged[i][0] and not flagged[i][1] for i in defect)
    dis = shadowed.disagreements(PRODUCT)
    assert {d["id"] for d in dis} == {i for i, (a, c) in expect.items() if a != c}
    for d in dis:  # both heatmaps, for the engineer to compare
        assert d["heatmap_path"] and d["shadow_heatmap_path"] and d["shadow_heatmap_path"] != d["heatmap_path"]
        assert Path(d["shadow_heatmap_path"]).is_file() and Path(d["heatmap_path"]).is_file()
    # a promoted candidate is no shadow any more: inspections are not scored twice
    shadowed.promote(PRODUCT, cand, actor="eng")
    n = len(shadowed.store.history(limit=None))
    rec = shadowed.inspect(PRODUCT, parts[0])
    assert shadowed.shadow.wait_idle(timeout=deadline(60)) and shadowed.store.shadow_rows(rec.id) == []
    assert len(shadowed.store.history(limit=None)) == n + 1


def test_shadow_drops_parts_instead_of_blocking(make_station, template, brick):
    _, active, cand, _ = template
    st = make_station("busy", shadow_queue=2)
    st.set_shadow(PRODUCT, cand, actor="eng")
    started, release = threading.Event(), threading.Event()
    score = st.shadow.score

    def slow_candidate(job):  # a candidate far slower than the line
        started.set()
        assert release.wait(deadline(120))
        return score(job)

    st.shadow.score = slow_candidate
    parts = _parts(brick)[:6]
    first = st.inspect(PRODUCT, parts[0], source="p0")
    assert started.wait(deadline(60))  # the worker holds part 0 ...
    done = threading.Event()
    ids = [first.id]

    def line():  # ... while the line inspects five more
        for i, img in enumerate(parts[1:], 1):
            ids.append(st.inspect(PRODUCT, img, source=f"p{i}").id)
        done.set()

    threading.Thread(target=line, daemon=True).start()
    assert done.wait(deadline(120)), "the caller waited for the shadow worker"
    assert not release.is_set()  # every inspection returned while the candidate was still busy
    assert st.shadow.dropped[(PRODUCT, cand)] == 3  # two queued, three dropped
    t = st.shadow_tally(PRODUCT)
    assert (t["dropped"], t["scored"], t["pending"]) == (3, 0, 3)
    release.set()
    assert st.shadow.wait_idle(timeout=deadline(120))
    t = st.shadow_tally(PRODUCT)
    assert (t["scored"], t["dropped"], t["pending"]) == (3, 3, 0)
    rows = {i: st.store.shadow_rows(i) for i in ids}
    assert all(len(r) == 1 for r in rows.values())
    assert [i for i, (r,) in rows.items() if r["error"] is None] == ids[:3]  # the first part and the two queued
    assert all(r["error"].startswith("dropped") for i, (r,) in rows.items() if i not in ids[:3])
    st.close()
    assert not st.shadow._thread.is_alive()
    late = st.inspect(PRODUCT, parts[0], source="late")  # after close: never blocks, counted as dropped
    st.shadow.flush_drops()
    assert st.store.shadow_rows(late.id)[0]["error"].startswith("dropped")


def test_a_local_batch_feeds_the_shadow(make_station, template, brick, tmp_path):
    _, active, cand, cand_thr = template
    st = make_station("batch")
    st.set_shadow(PRODUCT, cand, actor="eng")
    folder = tmp_path / "folder"
    for i, img in enumerate(_parts(brick)[:5]):
        write_image(folder / f"p{i}.png", img)
    (folder / "broken.png").write_bytes(b"not a png")
    summary = st.batch(folder, PRODUCT, progress=False, report=False, batch_size=2)
    assert st.shadow.wait_idle(timeout=deadline(120))
    rows = st.store.history(batch_id=summary.batch_id, limit=None)
    assert len(rows) == 6
    for r in rows:
        shadow = st.store.shadow_rows(r["id"])
        if r["verdict"] == "ERROR":
            assert shadow == []  # nothing was scored, nothing to compare
            continue
        assert r["model_version"] == active
        (s,) = shadow
        assert s["verdict"] == str(cand_thr.decide(s["score"])) and s["score"] == pytest.approx(r["score"], rel=1e-4)
    assert st.shadow_tally(PRODUCT)["scored"] == 5


def test_cli_shadow_start_show_stop(make_station, template, brick, capsys):
    """`inspector shadow` starts a candidate, shows the tally of the parts it scored (the same numbers
    the service reports), and stops it; each change is an audit row."""
    from inspector.cli.main import main

    _, active, cand, _ = template
    st = make_station("cli")
    data = str(st.data_dir)
    assert main(["shadow", PRODUCT, cand[:8], "--data-dir", data, "--actor", "eng"]) == 0
    assert st.registry.shadow_version(PRODUCT) == cand
    for img in _parts(brick)[:4]:
        st.inspect(PRODUCT, img)
    assert st.shadow.wait_idle(deadline(60))
    capsys.readouterr()
    assert main(["shadow", PRODUCT, "--json", "--data-dir", data]) == 0
    import json

    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == cand
    assert shown["tally"]["scored"] == st.shadow_tally(PRODUCT)["scored"] == 4
    assert main(["shadow", PRODUCT, "--stop", "--data-dir", data, "--actor", "eng"]) == 0
    assert st.registry.shadow_version(PRODUCT) is None
    actions = [r["action"] for r in st.store.audit_log(PRODUCT) if r["actor"] == "eng"]
    assert len(actions) == 2, actions
    assert main(["shadow", PRODUCT, cand, "--stop", "--data-dir", data]) != 0  # both: a usage error
