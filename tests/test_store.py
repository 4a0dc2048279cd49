"""The inspection store: concurrency, migrations, batch uniqueness, audit trail."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from inspector.station import store as store_mod
from inspector.station.store import SCHEMA_VERSION, Store


def _row(i, **kw):
    return dict(product="p", source=f"img-{i}", image_sha256="0" * 64, score=0.5, verdict="OK",
                model_version="v1", **kw)


def test_eight_concurrent_writer_threads_lose_no_rows(tmp_path):
    st = Store(f"sqlite:///{tmp_path}/db.sqlite")
    n_threads, per_thread = 8, 40
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def writer(t):
        try:
            barrier.wait()
            for i in range(per_thread):
                if i % 4 == 3:  # batch-style multi-row transactions interleaved with single rows
                    st.record_inspections([_row(f"{t}-{i}-a", batch_id=f"b{t}"), _row(f"{t}-{i}-b", batch_id=f"b{t}")])
                else:
                    st.record_inspection(**_row(f"{t}-{i}"))
                if i % 10 == 0:
                    st.audit(actor=f"t{t}", action="test", product="p", details={"i": i})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    per = per_thread // 4 * 2 + per_thread * 3 // 4
    assert st.count() == n_threads * per
    assert len({r["source"] for r in st.history(limit=None)}) == n_threads * per
    assert len(st.audit_log(limit=None)) == n_threads * 4
    # a second handle (another process would do the same) sees every row
    assert Store(f"sqlite:///{tmp_path}/db.sqlite").count() == n_threads * per


def test_sqlite_pragmas_and_schema(tmp_path):
    st = Store(tmp_path / "x.db")  # a bare path means SQLite
    with st.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    assert st.schema_version() == SCHEMA_VERSION
    cols = {c["name"] for c in sa_inspect(st.engine).get_columns("inspections")}
    assert {"product", "source", "created_at", "image_sha256", "score", "verdict", "heatmap_path", "model_version",
            "latency_ms", "batch_id", "error", "decision", "operator", "decided_at"} <= cols


def test_old_database_is_migrated_in_place(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/old.db"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 1)
    old = Store(url)
    old.record_inspection(**_row(1))
    assert old.schema_version() == 1
    assert not any(ix["name"] == "ix_inspections_verdict" for ix in sa_inspect(old.engine).get_indexes("inspections"))
    old.close()
    monkeypatch.undo()
    new = Store(url)
    assert new.schema_version() == SCHEMA_VERSION
    assert any(ix["name"] == "ix_inspections_verdict" for ix in sa_inspect(new.engine).get_indexes("inspections"))
    assert new.count() == 1  # data kept


def test_batch_rows_are_unique_per_source(tmp_path):
    st = Store(f"sqlite:///{tmp_path}/db.sqlite")
    rows = [_row(1, batch_id="B"), _row(2, batch_id="B")]
    assert st.record_inspections(rows) == 2
    assert st.record_inspections(rows + [_row(3, batch_id="B")]) == 1  # only the new one
    assert st.record_inspections([_row(1, batch_id="C")]) == 1  # same file, other batch
    assert st.batch_sources("B") == {"img-1", "img-2", "img-3"}
    # rows without a batch (station inspections) may repeat a source
    st.record_inspection(**_row(9))
    st.record_inspection(**_row(9))
    assert st.count(product="p") == 6


def test_history_filters_decisions_and_audit(tmp_path):
    st = Store(f"sqlite:///{tmp_path}/db.sqlite")
    a = st.record_inspection(**_row(1))
    st.record_inspection(product="q", source="x", image_sha256=None, score=None, verdict="ERROR",
                         model_version="v", error="empty file")
    c = st.record_inspection(**{**_row(3), "verdict": "NG"})
    assert [r["id"] for r in st.history()] == [c, a + 1, a]  # newest first
    assert [r["id"] for r in st.history(verdict="ng")] == [c]
    assert st.history(product="q")[0]["error"] == "empty file"
    assert st.history(since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert st.history(limit=1)[0]["created_at"].tzinfo is not None
    st.set_decision(c, "reject", operator="ann")
    row = st.get(c)
    assert row["decision"] == "reject" and row["operator"] == "ann" and row["decided_at"] is not None
    with pytest.raises(ValueError):
        st.set_decision(c, "maybe")
    with pytest.raises(KeyError):
        st.set_decision(10_000, "accept", operator="ann")
    st.audit(actor="eng", action="register", product="p", details={"shots": 2})
    log = st.audit_log("p")
    assert log[0]["details"] == {"shots": 2} and log[0]["actor"] == "eng"


def test_decisions_are_an_append_only_trail(tmp_path):
    st = Store(f"sqlite:///{tmp_path}/db.sqlite")
    i = st.record_inspection(**{**_row(1), "verdict": "UNCERTAIN"})
    j = st.record_inspection(**{**_row(2), "verdict": "UNCERTAIN"})
    assert [r["id"] for r in st.pending_review()] == [i, j]  # oldest first
    with pytest.raises(ValueError, match="operator"):
        st.record_decision(i, "accept", "  ")  # never blank
    first = st.record_decision(i, "accept", "ann", expect_latest=None)
    assert [r["id"] for r in st.pending_review()] == [j]
    with pytest.raises(store_mod.DecisionConflict):  # bob was shown "no decision yet"
        st.record_decision(i, "reject", "bob", expect_latest=None)
    second = st.record_decision(i, "reject", "bob", reason="scratch", note="visible at 2x", expect_latest=first["id"])
    trail = st.decisions(i)
    assert [(d["decision"], d["operator"], d["replaces"], d["previous"]) for d in trail] == [
        ("accept", "ann", None, None), ("reject", "bob", first["id"], "accept")]
    assert trail[1]["reason"] == "scratch" and trail[1]["note"] == "visible at 2x"
    assert trail[0]["created_at"] <= trail[1]["created_at"]
    row = st.get(i)  # the listing cache shows the latest
    assert (row["decision"], row["operator"]) == ("reject", "bob")
    audit = [a for a in st.audit_log(limit=None) if a["action"] == "decision"]
    assert [(a["actor"], a["details"]["decision"], a["details"]["previous"]) for a in reversed(audit)] == [
        ("ann", "accept", None), ("bob", "reject", "accept")]
    assert second["id"] == audit[0]["details"]["decision_id"]
    with st.engine.connect() as c:  # the database itself refuses to rewrite history
        for sql in ("UPDATE decisions SET decision='accept'", "DELETE FROM decisions"):
            with pytest.raises(Exception, match="append-only"):
                c.execute(text(sql))
    assert len(st.decisions()) == 2


def test_migration_copies_cached_decisions_into_the_trail(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/old.db"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:2])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 2)
    old = Store(url)
    a = old.record_inspection(**_row(1))
    with old.engine.begin() as c:  # how the v2 station stored a decision: one overwritable column
        c.execute(text("UPDATE inspections SET decision='reject', operator=NULL WHERE id=:i"), {"i": a})
    old.close()
    monkeypatch.undo()
    new = Store(url)
    assert [(d["decision"], d["operator"]) for d in new.decisions(a)] == [("reject", "unknown")]


def test_v3_database_gains_masks_and_shadow_results(tmp_path, monkeypatch):
    """Migration 4 on a database made by the v3 inspector (decisions without ``mask_sha256``):
    the column and the append-only shadow table appear, the decision trail is kept."""
    url = f"sqlite:///{tmp_path}/v3.db"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:3])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 3)
    old = Store(url)
    a = old.record_inspection(**{**_row(1), "verdict": "UNCERTAIN"})
    with old.engine.begin() as c:  # the v3 table had no mask column
        c.execute(text("ALTER TABLE decisions DROP COLUMN mask_sha256"))
        c.execute(text("INSERT INTO decisions (inspection_id, created_at, operator, decision) "
                       "VALUES (:i, '2024-01-01 00:00:00', 'ann', 'accept')"), {"i": a})
    assert "mask_sha256" not in {c["name"] for c in sa_inspect(old.engine).get_columns("decisions")}
    old.close()
    monkeypatch.undo()
    new = Store(url)
    assert new.schema_version() == SCHEMA_VERSION >= 4
    assert "mask_sha256" in {c["name"] for c in sa_inspect(new.engine).get_columns("decisions")}
    assert [(d["decision"], d["operator"], d["mask_sha256"]) for d in new.decisions(a)] == [("accept", "ann", None)]
    new.record_shadow(inspection_id=a, product="p", version="cand", score=1.0, verdict="OK")
    with new.engine.connect() as c:
        for sql in ("UPDATE shadow_results SET verdict='NG'", "DELETE FROM shadow_results"):
            with pytest.raises(Exception, match="append-only"):
                c.execute(text(sql))
    assert [r["verdict"] for r in new.shadow_rows(a)] == ["OK"]


def test_accepting_ng_needs_a_reason_and_masks_are_recorded(tmp_path):
    st = Store(f"sqlite:///{tmp_path}/db.sqlite")
    ng = st.record_inspection(**{**_row(1), "verdict": "NG"})
    unc = st.record_inspection(**{**_row(2), "verdict": "UNCERTAIN"})
    with pytest.raises(ValueError, match="reason"):
        st.record_decision(ng, "accept", "ann")
    with pytest.raises(ValueError, match="reason"):
        st.record_decision(ng, "accept", "ann", reason="   ")
    assert st.decisions(ng) == []  # nothing written
    st.record_decision(unc, "accept", "ann")  # an UNCERTAIN part may be accepted without one
    st.record_decision(ng, "reject", "ann", mask_sha256="f" * 64)  # rejecting never needs one
    d = st.record_decision(ng, "accept", "bob", reason="false-alarm")
    assert d["reason"] == "false-alarm"
    trail = st.decisions(ng)
    assert [(t["decision"], t["mask_sha256"]) for t in trail] == [("reject", "f" * 64), ("accept", None)]
    audit = [a for a in st.audit_log(limit=None) if a["action"] == "decision"]
    assert {a["details"]["mask_sha256"] for a in audit} == {None, "f" * 64}


def test_evidence_is_the_latest_decision_per_inspection(tmp_path):
    st = Store(f"sqlite:///{tmp_path}/db.sqlite")
    a = st.record_inspection(**{**_row(1), "verdict": "NG", "image_sha256": "a" * 64})
    b = st.record_inspection(**{**_row(2), "verdict": "OK", "image_sha256": "b" * 64})
    st.record_inspection(**{**_row(3), "verdict": "NG"})  # undecided: no evidence
    st.record_inspection(**{**_row(4), "product": "other", "verdict": "NG"})
    st.record_decision(a, "reject", "ann")
    st.record_decision(b, "accept", "ann")
    last = st.record_decision(a, "accept", "bob", reason="false-alarm", note="dust")
    rows = st.evidence("p")
    assert [(r["inspection_id"], r["decision"], r["operator"]) for r in rows] == [(b, "accept", "ann"),
                                                                                  (a, "accept", "bob")]
    r = rows[1]
    assert r["decision_id"] == last["id"] and r["image_sha256"] == "a" * 64 and r["verdict"] == "NG"
    assert r["reason"] == "false-alarm" and r["model_version"] == "v1" and r["decided_at"].tzinfo is not None
    assert st.evidence("other") == []


def test_shadow_tally_counts_agreement_and_who_was_right(tmp_path):
    """Each part's active verdict, candidate verdict and (maybe) decision, and what the tally must say."""
    st = Store(f"sqlite:///{tmp_path}/db.sqlite")
    parts = [  # (active, candidate, decision)
        ("NG", "OK", "accept"),  # false alarm avoided
        ("UNCERTAIN", "OK", "accept"),  # false alarm avoided (a review saved)
        ("OK", "NG", "accept"),  # false alarm added
        ("NG", "OK", "reject"),  # defect missed by the candidate
        ("OK", "UNCERTAIN", "reject"),  # defect caught by the candidate only
        ("NG", "NG", "reject"),  # both right
        ("OK", "OK", None),  # agree, undecided
        ("NG", "UNCERTAIN", None),  # disagree, undecided
    ]
    ids = []
    for i, (active, cand, decision) in enumerate(parts):
        iid = st.record_inspection(**{**_row(i), "verdict": active})
        ids.append(iid)
        st.record_shadow(inspection_id=iid, product="p", version="cand", score=float(i), verdict=cand,
                         heatmap_path=f"/h/{i}.png" if active != cand else None)
        if decision:
            st.record_decision(iid, decision, "ann", reason="false-alarm")
    dropped = st.record_inspection(**_row(90))
    st.record_shadows([{"inspection_id": dropped, "product": "p", "version": "cand", "error": "dropped: full"}])
    failed = st.record_inspection(**_row(91))
    st.record_shadow(inspection_id=failed, product="p", version="cand", error="RuntimeError: boom")
    st.record_shadow(inspection_id=ids[0], product="p", version="other", score=0.0, verdict="NG")  # another candidate
    t = st.shadow_tally("p", "cand")
    assert {k: t[k] for k in ("scored", "dropped", "failed", "agree", "disagree", "decided")} == {
        "scored": 8, "dropped": 1, "failed": 1, "agree": 2, "disagree": 6, "decided": 6}
    assert {k: t[k] for k in ("false_alarms_avoided", "false_alarms_added", "defects_missed", "defects_caught")} == {
        "false_alarms_avoided": 2, "false_alarms_added": 1, "defects_missed": 1, "defects_caught": 1}
    # flagged = not OK; right = flagged exactly when a defect. Candidate right on 0, 1, 4, 5; active on 2, 3, 5
    assert (t["candidate_right"], t["candidate_wrong"]) == (4, 2)
    assert (t["active_right"], t["active_wrong"]) == (3, 3)
    dis = st.disagreements("p", "cand")
    assert [d["id"] for d in dis] == [ids[i] for i in (7, 4, 3, 2, 1, 0)]  # newest first
    assert dis[-1]["verdict"] == "NG" and dis[-1]["shadow_verdict"] == "OK" and dis[-1]["shadow_heatmap_path"] == "/h/0.png"
    assert dis[-1]["decision"] == "accept" and dis[0]["decision"] is None
    assert st.shadow_tally("p", "other")["scored"] == 1 and st.shadow_tally("p", "none")["scored"] == 0
