"""The inspection database: every inspection and every registry change (audit trail).

SQLAlchemy 2 Core over SQLite by default (``sqlite:///<data_dir>/inspector.db``); any SQLAlchemy
URL works, e.g. ``postgresql+psycopg://user:pw@host/inspector`` (install the driver).

SQLite is set up for several writers: WAL journal (readers never block the writer), a 30 s busy
timeout, and write transactions opened with ``BEGIN IMMEDIATE`` so concurrent writers queue on
the lock instead of failing with "database is locked". One :class:`Store` may be shared by many
threads; several processes may open the same file.

Schema versions live in ``schema_version``; :data:`MIGRATIONS` lists the steps, applied in order
inside one write transaction at start-up, so an old database is upgraded in place.

Batch rows carry ``batch_id``; ``(batch_id, source)`` is unique and batch inserts skip
conflicting rows, so a resumed batch can never record one file twice. Distributed batches
(:mod:`inspector.batch.ray`) write with :meth:`Store.upsert_batch_results`, idempotent per
``(batch_id, source, image_sha256)``.

Operator decisions are an append-only trail (``decisions``: who, when, accept/reject, which earlier
decision it replaces, optional reason code and note; SQLite triggers refuse UPDATE and DELETE on it).
Each decision is also written to ``audit``; the ``decision``/``operator``/``decided_at`` columns of
``inspections`` only cache the latest one for listing. Accepting an NG part needs a reason code (a
plant's usual rule: whoever passes a part the model rejected says why). A rejection may carry the
sha256 of a defect mask the operator painted (``mask_sha256``; the PNG lives in the evidence image
store, :mod:`inspector.products.feedback.images`). :meth:`Store.evidence` is the latest decision per
inspection with its inspection: what :mod:`inspector.products.feedback.evidence` turns into evidence.

Shadow results (``shadow_results``, append-only like ``decisions``): the verdict a candidate
product version gave the same part, scored beside the active version without changing anything
the station published (:mod:`inspector.station.shadow`). A part the shadow worker had no room for
is a row with ``error`` starting ``dropped``, so the tally counts drops too.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from inspector.batch.common import error_row
from inspector.paths import display, encode_source

log = logging.getLogger(__name__)

DECISIONS = ("accept", "reject")
#: Reason codes an operator may attach to a decision (free text goes in the note).
REASON_CODES = ("scratch", "dent", "stain", "missing-part", "contamination", "false-alarm", "image-quality", "other")
_ANY = object()  # "do not check" for record_decision(expect_latest=...)


class DecisionConflict(ValueError):
    """The inspection's latest decision is not the one the operator saw (someone decided meanwhile)."""


def check_reason(verdict: str | None, decision: str, reason: str | None) -> None:
    """Accepting an NG part needs a reason code: the part becomes a confirmed normal (evidence the
    next product version learns from), so whoever overrules the model says why. ValueError otherwise."""
    if str(decision).lower() == "accept" and str(verdict or "").upper() == "NG" and not (reason or "").strip():
        raise ValueError("accepting an NG part needs a reason code (one of " + ", ".join(REASON_CODES)
                         + "): say why the part is good")

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

inspections = Table(
    "inspections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("product", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("image_sha256", String(64)),
    Column("score", Float),
    Column("verdict", String(16)),  # OK / UNCERTAIN / NG, or ERROR when the file could not be scored
    Column("heatmap_path", Text),
    Column("model_version", String(64)),
    Column("latency_ms", Float),
    Column("batch_id", String(64)),
    Column("error", Text),
    Column("decision", String(16)),  # operator review: accept / reject
    Column("operator", String(128)),
    Column("decided_at", DateTime(timezone=True)),
    UniqueConstraint("batch_id", "source", name="uq_inspections_batch_source"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("product", String(64)),
    Column("details", Text, nullable=False),  # JSON
)

decisions = Table(
    "decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("inspection_id", Integer, ForeignKey("inspections.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("operator", String(128), nullable=False),
    Column("decision", String(16), nullable=False),  # accept / reject
    Column("replaces", Integer, ForeignKey("decisions.id")),  # the decision this one supersedes
    Column("reason", String(64)),  # optional reason code (REASON_CODES); required to accept an NG part
    Column("note", Text),
    Column("mask_sha256", String(64)),  # v4: the operator's defect mask (evidence image store)
)

shadow_results = Table(
    "shadow_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("inspection_id", Integer, ForeignKey("inspections.id"), nullable=False),
    Column("product", String(64), nullable=False),
    Column("version", String(64), nullable=False),  # the candidate (shadow) version
    Column("score", Float),
    Column("verdict", String(16)),  # the candidate's verdict; None when not scored (error set)
    Column("heatmap_path", Text),
    Column("error", Text),  # "dropped: ..." (no room on the shadow worker) or why scoring failed
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def _migrate_v1(conn: Connection) -> None:
    """Initial schema: inspections (with the batch/source uniqueness) and audit."""
    for table in (inspections, audit):
        table.create(conn, checkfirst=True)


def _migrate_v2(conn: Connection) -> None:
    """Indices for the station's history queries and batch resume. Plain DDL (SQLite and
    PostgreSQL both take ``IF NOT EXISTS``), not Index objects, which would attach themselves to
    the Table and be created again by v1 on a fresh database."""
    for name, table, cols in (
        ("ix_inspections_product_created", "inspections", "product, created_at"),
        ("ix_inspections_verdict", "inspections", "verdict"),
        ("ix_inspections_batch", "inspections", "batch_id"),
        ("ix_audit_product", "audit", "product, created_at"),
    ):
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({cols})")


def _migrate_decisions(conn: Connection) -> None:
    """The append-only decision trail. Decisions cached on ``inspections`` before it existed are
    copied in as their first rows; on SQLite, triggers make the table append-only."""
    decisions.create(conn, checkfirst=True)
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_decisions_inspection ON decisions (inspection_id, id)")
    conn.exec_driver_sql(
        "INSERT INTO decisions (inspection_id, created_at, operator, decision) "
        "SELECT id, COALESCE(decided_at, created_at), COALESCE(NULLIF(operator, ''), 'unknown'), decision "
        "FROM inspections WHERE decision IS NOT NULL")
    if conn.dialect.name == "sqlite":
        for op in ("UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS decisions_no_{op.lower()} BEFORE {op} ON decisions "
                "BEGIN SELECT RAISE(ABORT, 'decisions are append-only'); END")


def _append_only(conn: Connection, table: str) -> None:
    if conn.dialect.name == "sqlite":
        for op in ("UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END")


def _migrate_feedback(conn: Connection) -> None:
    """The learning loop: ``decisions.mask_sha256`` and the append-only ``shadow_results``. The
    column is added only where it is missing: on a fresh database step 3 already created
    ``decisions`` from the current table definition, which has it."""
    if "mask_sha256" not in {c["name"] for c in inspect(conn).get_columns("decisions")}:
        conn.exec_driver_sql("ALTER TABLE decisions ADD COLUMN mask_sha256 VARCHAR(64)")
    shadow_results.create(conn, checkfirst=True)
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_shadow_product_version "
                         "ON shadow_results (product, version, inspection_id)")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_shadow_inspection ON shadow_results (inspection_id)")
    _append_only(conn, "shadow_results")


#: (version, step) in order. Append new steps; never edit an applied one.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [(1, _migrate_v1), (2, _migrate_v2),
                                                               (3, _migrate_decisions), (4, _migrate_feedback)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class Store:
    """Inspections + audit trail behind one SQLAlchemy engine. Thread-safe."""

    def __init__(self, url: str | Path = "sqlite:///data/inspector.db", *, echo: bool = False):
        url = str(url)
        if "://" not in url:  # a plain path means a SQLite file
            url = f"sqlite:///{Path(url).resolve()}"
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            self._setup_sqlite(self.engine)
        self._lock = threading.Lock()  # only guards migration at start-up
        self.migrate()

    # -- engine set-up --------------------------------------------------------------------------
    @staticmethod
    def _setup_sqlite(engine: Engine) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            immediate = conn.get_execution_options().get("write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def _write(self):
        """A connection whose transaction takes the write lock up front (SQLite)."""
        return self.engine.connect().execution_options(write=True)

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found before."""
        with self._lock, self._write() as conn, conn.begin():
            if conn.dialect.name == "postgresql":  # serialise concurrent start-ups (SQLite: BEGIN IMMEDIATE)
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7274001)")
            schema_version.create(conn, checkfirst=True)
            current = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
            if current == 0 and inspect(conn).has_table("inspections"):
                current = 1  # created before versioning: treat as v1
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"database schema v{current} is newer than this inspector (v{SCHEMA_VERSION})")
            for version, step in MIGRATIONS:
                if version > current:
                    step(conn)
                    conn.execute(insert(schema_version).values(version=version, applied_at=utcnow()))
        return current

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)

    def close(self) -> None:
        self.engine.dispose()

    # -- inspections ----------------------------------------------------------------------------
    @staticmethod
    def _row(*, product, source, image_sha256=None, score=None, verdict=None, heatmap_path=None,
             model_version=None, latency_ms=None, batch_id=None, error=None, created_at=None) -> dict:
        if verdict is not None:
            verdict = str(getattr(verdict, "value", verdict))
        return {
            "product": str(product),
            "source": encode_source(source),  # lossless for any file name (see inspector.paths)
            "created_at": created_at or utcnow(),
            "image_sha256": image_sha256,
            "score": None if score is None else float(score),
            "verdict": verdict,
            "heatmap_path": None if heatmap_path is None else encode_source(heatmap_path),
            "model_version": model_version,
            "latency_ms": None if latency_ms is None else float(latency_ms),
            "batch_id": batch_id,
            "error": None if error is None else display(error),
        }

    def record_inspection(self, *, product, source, image_sha256, score, verdict, heatmap_path=None,
                          model_version, latency_ms=None, batch_id=None, error=None) -> int:
        """Insert one inspection; returns its id."""
        row = self._row(product=product, source=source, image_sha256=image_sha256, score=score,
                        verdict=verdict, heatmap_path=heatmap_path, model_version=model_version,
                        latency_ms=latency_ms, batch_id=batch_id, error=error)
        with self._write() as conn, conn.begin():
            return int(conn.execute(insert(inspections).values(**row)).inserted_primary_key[0])

    def record_inspections(self, rows: Iterable[dict]) -> int:
        """Insert many rows in ONE transaction; rows whose ``(batch_id, source)`` is already
        recorded are skipped. Returns how many were inserted. If the transaction fails, each row is
        retried in its own, so one bad row never takes its neighbours down with it (a row that
        still fails is recorded as ERROR with the reason, or logged if even that fails)."""
        rows = list(rows)
        if not rows:
            return 0
        try:
            return self._insert_rows([self._row(**r) for r in rows])
        except Exception:  # noqa: BLE001 - retried row by row below
            pass
        n = 0
        for r in rows:
            try:
                n += self._insert_rows([self._row(**r)])
            except Exception as exc:  # noqa: BLE001
                log.warning("could not record %s: %s", display(r.get("source")), exc)
                bad = error_row(r.get("product"), r.get("model_version"), r.get("source"),
                                f"could not record ({type(exc).__name__}: {exc})",
                                image_sha256=r.get("image_sha256"), batch_id=r.get("batch_id"))
                try:
                    n += self._insert_rows([self._row(**bad)])
                except Exception:  # noqa: BLE001
                    log.exception("could not record an ERROR row for %s", display(r.get("source")))
        return n

    def _insert_rows(self, rows: list[dict]) -> int:
        with self._write() as conn, conn.begin():
            stmt = self._insert_ignore(conn)
            return sum(max(0, conn.execute(stmt, [r]).rowcount) for r in rows)

    def _insert_ignore(self, conn: Connection):
        name = conn.dialect.name
        if name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        elif name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:  # other backends: plain insert, the unique constraint still refuses duplicates
            return insert(inspections)
        return dialect_insert(inspections).on_conflict_do_nothing(index_elements=["batch_id", "source"])

    def upsert_batch_results(self, rows: Iterable[dict]) -> int:
        """Idempotent write of batch results (the commit point of a distributed batch), in ONE
        transaction. A result is keyed by ``(batch_id, source, image_sha256)``: writing the same key
        again (a retried task, a worker that died after committing) changes nothing; a row for the
        same ``(batch_id, source)`` with a *different* sha256 (the file was replaced between two
        attempts) replaces the stale row, so one row per file always describes the bytes scored.
        Returns how many rows were inserted or replaced."""
        rows = [self._row(**r) for r in rows]
        if not rows:
            return 0
        with self._write() as conn, conn.begin():
            name = conn.dialect.name
            if name == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            elif name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            else:
                raise NotImplementedError(f"batch upserts need SQLite or PostgreSQL, not {name}")
            stmt = dialect_insert(inspections)
            cols = ("product", "created_at", "image_sha256", "score", "verdict", "heatmap_path", "model_version",
                    "latency_ms", "error")
            stmt = stmt.on_conflict_do_update(
                index_elements=["batch_id", "source"], set_={c: stmt.excluded[c] for c in cols},
                where=inspections.c.image_sha256.is_distinct_from(stmt.excluded.image_sha256))
            return sum(max(0, conn.execute(stmt, [r]).rowcount) for r in rows)

    def set_decision(self, inspection_id: int, decision: str, operator: str | None = None, **kw) -> dict:
        """Shorthand for :meth:`record_decision` (kept for callers of the first API)."""
        return self.record_decision(inspection_id, decision, operator, **kw)

    def record_decision(self, inspection_id: int, decision: str, operator: str | None, *, reason: str | None = None,
                        note: str | None = None, expect_latest=_ANY, mask_sha256: str | None = None) -> dict:
        """Append an operator's review ("accept" or "reject") of one inspection; returns the new row.

        ``operator`` must name a person (never blank). Accepting an NG part needs a ``reason``
        (:func:`check_reason`). A second decision on the same inspection is a new row that
        ``replaces`` the previous one; nothing is overwritten. ``expect_latest`` (the id of the
        latest decision the operator was shown, or None for "none yet") guards against silently
        replacing a decision someone else made meanwhile: :class:`DecisionConflict`.
        ``mask_sha256``: the defect mask painted with a rejection (stored by the caller first).
        """
        decision = str(decision).lower()
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        operator = (operator or "").strip()
        if not operator:
            raise ValueError("a decision needs an operator name")
        reason = (reason or "").strip() or None
        note = (note or "").strip() or None
        now = utcnow()
        with self._write() as conn, conn.begin():
            insp = conn.execute(select(inspections.c.id, inspections.c.product, inspections.c.verdict)
                                .where(inspections.c.id == int(inspection_id))).first()
            if insp is None:
                raise KeyError(f"no inspection with id {inspection_id}")
            check_reason(insp.verdict, decision, reason)
            prev = conn.execute(select(decisions).where(decisions.c.inspection_id == int(inspection_id))
                                .order_by(decisions.c.id.desc()).limit(1)).mappings().first()
            prev_id = None if prev is None else int(prev["id"])
            if expect_latest is not _ANY and expect_latest != prev_id:
                who = f"{prev['decision']} by {prev['operator']}" if prev is not None else "none"
                raise DecisionConflict(f"inspection {inspection_id} was decided meanwhile (latest: {who})")
            row = {"inspection_id": int(inspection_id), "created_at": now, "operator": operator,
                   "decision": decision, "replaces": prev_id, "reason": reason, "note": note,
                   "mask_sha256": mask_sha256}
            row["id"] = int(conn.execute(insert(decisions).values(**row)).inserted_primary_key[0])
            conn.execute(update(inspections).where(inspections.c.id == int(inspection_id))
                         .values(decision=decision, operator=operator, decided_at=now))
            details = {"inspection_id": int(inspection_id), "decision": decision, "decision_id": row["id"],
                       "replaces": prev_id, "previous": None if prev is None else prev["decision"],
                       "reason": reason, "note": note, "mask_sha256": mask_sha256}
            conn.execute(insert(audit).values(created_at=now, actor=operator, action="decision",
                                              product=insp.product, details=json.dumps(details, sort_keys=True)))
        return row

    def decisions(self, inspection_id: int | None = None, limit: int | None = None) -> list[dict]:
        """Decision rows, oldest first (for one inspection, or all), each with ``previous`` (the
        decision it replaced, or None)."""
        prev = decisions.alias("prev")
        q = (select(decisions, prev.c.decision.label("previous"))
             .select_from(decisions.outerjoin(prev, decisions.c.replaces == prev.c.id)))
        if inspection_id is not None:
            q = q.where(decisions.c.inspection_id == int(inspection_id))
        q = q.order_by(decisions.c.id)
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            return [self._out(r) for r in conn.execute(q).mappings()]

    def latest_decision(self, inspection_id: int) -> dict | None:
        rows = self.decisions(inspection_id)
        return rows[-1] if rows else None

    def pending_review(self, product: str | None = None, verdict: str = "UNCERTAIN", limit: int | None = 200) -> list[dict]:
        """Inspections with ``verdict`` and no decision yet, oldest first (the review queue)."""
        q = select(inspections).where(inspections.c.verdict == verdict, inspections.c.decision.is_(None))
        if product:
            q = q.where(inspections.c.product == product)
        q = q.order_by(inspections.c.created_at, inspections.c.id)
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            return [self._out(r) for r in conn.execute(q).mappings()]

    def get(self, inspection_id: int) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(select(inspections).where(inspections.c.id == int(inspection_id))).mappings().first()
        if row is None:
            raise KeyError(f"no inspection with id {inspection_id}")
        return self._out(row)

    @staticmethod
    def _out(row) -> dict:
        d = dict(row)
        for k in ("created_at", "decided_at"):
            if k in d:
                d[k] = _aware(d[k])
        return d

    def history(self, product: str | None = None, verdict: str | None = None, since: datetime | None = None,
                limit: int | None = 200, batch_id: str | None = None, offset: int = 0) -> list[dict]:
        """Newest first. ``verdict`` may be OK / UNCERTAIN / NG / ERROR; ``limit=None`` for all."""
        q = select(inspections)
        if product:
            q = q.where(inspections.c.product == product)
        if verdict:
            q = q.where(inspections.c.verdict == str(getattr(verdict, "value", verdict)).upper())
        if since is not None:
            q = q.where(inspections.c.created_at >= since)
        if batch_id:
            q = q.where(inspections.c.batch_id == batch_id)
        q = q.order_by(inspections.c.created_at.desc(), inspections.c.id.desc()).offset(offset)
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            return [self._out(r) for r in conn.execute(q).mappings()]

    def count(self, product: str | None = None, batch_id: str | None = None, verdict: str | None = None) -> int:
        q = select(func.count()).select_from(inspections)
        if product:
            q = q.where(inspections.c.product == product)
        if batch_id:
            q = q.where(inspections.c.batch_id == batch_id)
        if verdict:
            q = q.where(inspections.c.verdict == verdict)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def batch_sources(self, batch_id: str) -> set[str]:
        """Sources already recorded for ``batch_id`` (what a resumed batch skips)."""
        with self.engine.connect() as conn:
            return set(conn.execute(select(inspections.c.source).where(inspections.c.batch_id == batch_id)).scalars())

    def inspection_id(self, batch_id: str, source) -> int | None:
        """The id of a batch's row for ``source`` (unique per batch), or None."""
        with self.engine.connect() as conn:
            v = conn.execute(select(inspections.c.id).where(inspections.c.batch_id == batch_id,
                                                             inspections.c.source == encode_source(source))).scalar()
        return None if v is None else int(v)

    # -- evidence (latest decision per inspection) ------------------------------------------------
    @staticmethod
    def _latest_decisions():
        """Subquery: the id of the latest decision of each decided inspection."""
        return (select(decisions.c.inspection_id, func.max(decisions.c.id).label("decision_id"))
                .group_by(decisions.c.inspection_id).subquery("latest"))

    def evidence(self, product: str) -> list[dict]:
        """The latest decision of every decided inspection of ``product`` joined with its
        inspection, oldest decision first. Keys: ``inspection_id, decision_id, decision, operator,
        reason, note, mask_sha256, decided_at`` (of the decision) and ``source, image_sha256,
        score, verdict, model_version, heatmap_path, created_at, batch_id`` (of the inspection).
        :func:`inspector.products.feedback.evidence.item_from_row` turns a row into evidence."""
        latest = self._latest_decisions()
        q = (select(latest.c.inspection_id, latest.c.decision_id, decisions.c.decision, decisions.c.operator,
                    decisions.c.reason, decisions.c.note, decisions.c.mask_sha256,
                    decisions.c.created_at.label("decided_at"), inspections.c.source, inspections.c.image_sha256,
                    inspections.c.score, inspections.c.verdict, inspections.c.model_version,
                    inspections.c.heatmap_path, inspections.c.created_at, inspections.c.batch_id)
             .select_from(latest.join(decisions, decisions.c.id == latest.c.decision_id)
                          .join(inspections, inspections.c.id == latest.c.inspection_id))
             .where(inspections.c.product == product)
             .order_by(latest.c.decision_id))
        with self.engine.connect() as conn:
            return [self._out(r) for r in conn.execute(q).mappings()]

    # -- shadow results -------------------------------------------------------------------------
    def record_shadow(self, *, inspection_id: int, product: str, version: str, score: float | None = None,
                      verdict=None, heatmap_path=None, error: str | None = None) -> int:
        """Append the candidate version's result for one inspection; returns its id."""
        return self.record_shadows([dict(inspection_id=inspection_id, product=product, version=version,
                                         score=score, verdict=verdict, heatmap_path=heatmap_path, error=error)])[0]

    def record_shadows(self, rows: Iterable[dict]) -> list[int]:
        """Append several shadow results in one transaction (the worker's dropped parts)."""
        now = utcnow()
        out = []
        rows = [{"inspection_id": int(r["inspection_id"]), "product": str(r["product"]), "version": str(r["version"]),
                 "score": None if r.get("score") is None else float(r["score"]),
                 "verdict": None if r.get("verdict") is None else str(getattr(r["verdict"], "value", r["verdict"])),
                 "heatmap_path": None if r.get("heatmap_path") is None else encode_source(r["heatmap_path"]),
                 "error": None if r.get("error") is None else display(r["error"]), "created_at": now}
                for r in rows]
        if not rows:
            return []
        with self._write() as conn, conn.begin():
            for r in rows:
                out.append(int(conn.execute(insert(shadow_results).values(**r)).inserted_primary_key[0]))
        return out

    def shadow_rows(self, inspection_id: int) -> list[dict]:
        """Every shadow result recorded for one inspection, oldest first."""
        q = select(shadow_results).where(shadow_results.c.inspection_id == int(inspection_id)).order_by(
            shadow_results.c.id)
        with self.engine.connect() as conn:
            return [self._out(r) for r in conn.execute(q).mappings()]

    def shadow_tally(self, product: str, version: str) -> dict:
        """How candidate ``version`` of ``product`` did in shadow, against the active verdicts and,
        where an operator decided, against the truth (the latest decision, labelled by
        :func:`~inspector.products.feedback.evidence.evidence_label`). A verdict other than OK
        counts as *flagged* (NG is rejected, UNCERTAIN goes to review: both cost a look).

        ``scored`` / ``dropped`` (no room on the worker) / ``failed``; ``agree`` / ``disagree``
        (same verdict as the active version or not); ``decided`` (scored parts with a decision);
        ``false_alarms_avoided`` (confirmed normal, active flagged, candidate OK),
        ``false_alarms_added`` (confirmed normal, active OK, candidate flagged), ``defects_missed``
        (confirmed defect, active flagged, candidate OK), ``defects_caught`` (confirmed defect,
        active OK, candidate flagged); ``candidate_right`` / ``candidate_wrong`` and
        ``active_right`` / ``active_wrong`` over the decided parts."""
        from inspector.products.feedback.evidence import evidence_label

        latest = self._latest_decisions()
        kind = case((shadow_results.c.error.is_(None), "scored"),
                    (shadow_results.c.error.like("dropped%"), "dropped"), else_="failed").label("kind")
        q = (select(kind, shadow_results.c.verdict.label("shadow_verdict"), inspections.c.verdict,
                    decisions.c.decision, func.count().label("n"))
             .select_from(shadow_results.join(inspections, inspections.c.id == shadow_results.c.inspection_id)
                          .outerjoin(latest, latest.c.inspection_id == shadow_results.c.inspection_id)
                          .outerjoin(decisions, decisions.c.id == latest.c.decision_id))
             .where(shadow_results.c.product == product, shadow_results.c.version == version)
             .group_by(kind, shadow_results.c.verdict, inspections.c.verdict, decisions.c.decision))
        keys = ("scored", "dropped", "failed", "agree", "disagree", "decided", "false_alarms_avoided",
                "false_alarms_added", "defects_missed", "defects_caught", "candidate_right", "candidate_wrong",
                "active_right", "active_wrong")
        t = {"product": product, "version": version, **dict.fromkeys(keys, 0)}
        with self.engine.connect() as conn:
            groups = list(conn.execute(q).mappings())
        for g in groups:
            n = int(g["n"])
            t[g["kind"]] += n
            if g["kind"] != "scored":
                continue
            t["agree" if g["shadow_verdict"] == g["verdict"] else "disagree"] += n
            label = evidence_label(g["verdict"], g["decision"])
            if label is None:
                continue
            t["decided"] += n
            cand, act = g["shadow_verdict"] != "OK", g["verdict"] != "OK"  # flagged?
            t["candidate_right" if cand == (label == "defect") else "candidate_wrong"] += n
            t["active_right" if act == (label == "defect") else "active_wrong"] += n
            if label == "normal" and act and not cand:
                t["false_alarms_avoided"] += n
            elif label == "normal" and cand and not act:
                t["false_alarms_added"] += n
            elif label == "defect" and act and not cand:
                t["defects_missed"] += n
            elif label == "defect" and cand and not act:
                t["defects_caught"] += n
        return t

    def disagreements(self, product: str, version: str, limit: int | None = 50) -> list[dict]:
        """Parts where candidate ``version`` gave another verdict than the active one, newest first:
        the inspection's ``id, source, created_at, verdict, score, heatmap_path, model_version``, the
        candidate's ``shadow_version, shadow_verdict, shadow_score, shadow_heatmap_path``, and the
        latest decision (``decision``, ``operator``, ``reason``; None when undecided)."""
        latest = self._latest_decisions()
        q = (select(inspections.c.id, inspections.c.source, inspections.c.created_at, inspections.c.verdict,
                    inspections.c.score, inspections.c.heatmap_path, inspections.c.model_version,
                    inspections.c.image_sha256, shadow_results.c.version.label("shadow_version"),
                    shadow_results.c.verdict.label("shadow_verdict"), shadow_results.c.score.label("shadow_score"),
                    shadow_results.c.heatmap_path.label("shadow_heatmap_path"), decisions.c.decision,
                    decisions.c.operator, decisions.c.reason)
             .select_from(shadow_results.join(inspections, inspections.c.id == shadow_results.c.inspection_id)
                          .outerjoin(latest, latest.c.inspection_id == shadow_results.c.inspection_id)
                          .outerjoin(decisions, decisions.c.id == latest.c.decision_id))
             .where(shadow_results.c.product == product, shadow_results.c.version == version,
                    shadow_results.c.error.is_(None), shadow_results.c.verdict != inspections.c.verdict)
             .order_by(inspections.c.created_at.desc(), inspections.c.id.desc()))
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            return [self._out(r) for r in conn.execute(q).mappings()]

    # -- audit trail ----------------------------------------------------------------------------
    def audit(self, *, actor: str, action: str, product: str | None, details: dict | None = None) -> int:
        row = {"created_at": utcnow(), "actor": str(actor or "unknown"), "action": str(action),
               "product": product, "details": json.dumps(details or {}, sort_keys=True, default=str)}
        with self._write() as conn, conn.begin():
            return int(conn.execute(insert(audit).values(**row)).inserted_primary_key[0])

    def audit_log(self, product: str | None = None, limit: int | None = 200) -> list[dict]:
        q = select(audit)
        if product:
            q = q.where(audit.c.product == product)
        q = q.order_by(audit.c.created_at.desc(), audit.c.id.desc())
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            out = []
            for r in conn.execute(q).mappings():
                d = self._out(r)
                d["details"] = json.loads(d["details"] or "{}")
                out.append(d)
            return out


__all__ = ["DECISIONS", "MIGRATIONS", "REASON_CODES", "SCHEMA_VERSION", "DecisionConflict", "Store", "check_reason",
           "utcnow"]
