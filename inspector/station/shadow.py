"""Shadow mode: a candidate product version scores the same parts as the active one, off to the side.

When a product has a shadow version (``ProductRegistry.shadow_version``), every inspection the
station records (station and Live through :meth:`StationService.inspect`, the line through the same
call, local batches through the batch's ``on_recorded`` hook) is handed to one
:class:`ShadowWorker`, which scores it with the candidate and appends the candidate's result to
``shadow_results``. Nothing the station publishes depends on it: the verdict, the recorded row, the
returned record and every PLC output were settled before the part reached the worker.

**Cost.** One extra scoring per part (the candidate's model on the same image, plus a heatmap PNG
when the two verdicts differ), done on the worker's single thread, so on a CPU station it competes
with the line for cores, and on a GPU for the device. It is **bounded**: the worker has a queue of
fixed size; a part that finds it full is **dropped** (counted, and recorded as a ``dropped`` shadow
row so that the tally shows it), never waited for. Submitting is a non-blocking ``put``: the caller
never slows down, whatever the candidate costs. A candidate that cannot keep up therefore scores a
sample of the parts, and the tally says how large.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Parts waiting for the candidate at most (beyond the one being scored).
DEFAULT_QUEUE = 8


@dataclass
class ShadowJob:
    """One part for the candidate. Station parts carry their image and row id; batch parts carry
    ``batch_id`` + ``source`` (the row id is looked up) and their image is read by the scorer."""

    product: str
    version: str
    inspection_id: int | None = None
    rgb: np.ndarray | None = None
    sha256: str | None = None
    batch_id: str | None = None
    source: str | None = None
    verdict: str | None = None  # the active version's verdict (a heatmap is kept only on disagreement)


class ShadowWorker:
    """A bounded queue and one daemon thread that scores :class:`ShadowJob` s with ``score(job) ->
    dict(score=, verdict=, heatmap_path=)`` and records the results in ``store``.

    ``submit`` never blocks; a full queue drops the part. Drops are written by the worker (or by
    :meth:`flush_drops`), never by the submitting thread, so not even a database write is added to
    the caller's path."""

    def __init__(self, score: Callable[[ShadowJob], dict], store, queue_size: int = DEFAULT_QUEUE):
        self.score = score
        self.store = store
        self.queue_size = max(1, int(queue_size))
        self._q: queue.Queue[ShadowJob | None] = queue.Queue(self.queue_size)
        self._cond = threading.Condition()
        self._pending = 0  # submitted and not yet finished
        self._drops: list[tuple[ShadowJob, str]] = []  # dropped, not yet written (job, why)
        self.dropped: Counter = Counter()  # (product, version) -> parts dropped since start
        self.scored: Counter = Counter()  # (product, version) -> parts scored since start
        self._thread: threading.Thread | None = None
        self._closed = False
        self._start_lock = threading.Lock()

    # -- the caller's side ----------------------------------------------------------------------
    def submit(self, job: ShadowJob) -> bool:
        """Queue ``job`` for the candidate; False (and counted as dropped) when the queue is full or
        the worker is closed. Never blocks."""
        if self._closed:
            return self._drop(job, "the station closed")
        self._ensure_thread()
        with self._cond:
            self._pending += 1
        try:
            self._q.put_nowait(job)
        except queue.Full:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
            return self._drop(job, f"the shadow queue ({self.queue_size}) was full")
        return True

    def has_room(self) -> bool:
        """Whether a submit now would likely be queued (lets the caller skip copying an image)."""
        return not self._closed and not self._q.full()

    def _drop(self, job: ShadowJob, why: str) -> bool:
        with self._cond:
            self._drops.append((job, why))
            self.dropped[(job.product, job.version)] += 1
            self._cond.notify_all()
        return False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued part is scored and every drop written; False on timeout."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._pending == 0, timeout)
        self.flush_drops()
        return ok

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    # -- the worker -----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shadow-worker", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                self.flush_drops()
                if self._closed:
                    self._drop(job, "the station closed")
                else:
                    self._process(job)
            except Exception:  # noqa: BLE001 - a failing candidate never stops the worker
                log.exception("shadow: could not record a result")
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _resolve(self, job: ShadowJob) -> int | None:
        if job.inspection_id is not None:
            return int(job.inspection_id)
        if job.batch_id is not None and job.source is not None:
            return self.store.inspection_id(job.batch_id, job.source)
        return None

    def _process(self, job: ShadowJob) -> None:
        iid = self._resolve(job)
        if iid is None:
            return  # the row was never recorded (a resumed batch's duplicate): nothing to compare with
        job.inspection_id = iid
        row = {"inspection_id": iid, "product": job.product, "version": job.version}
        try:
            row.update(self.score(job))
        except Exception as exc:  # noqa: BLE001 - recorded as a failed shadow result
            log.warning("shadow: %s@%s could not score inspection %s: %s", job.product, job.version, iid, exc)
            row["error"] = f"{type(exc).__name__}: {exc}"
        self.store.record_shadow(**row)
        if row.get("error") is None:
            with self._cond:
                self.scored[(job.product, job.version)] += 1

    def flush_drops(self) -> int:
        """Write the dropped parts as ``dropped`` shadow rows; returns how many were written."""
        with self._cond:
            drops, self._drops = self._drops, []
        rows = []
        for job, why in drops:
            try:
                iid = self._resolve(job)
            except Exception:  # noqa: BLE001
                log.exception("shadow: could not look up a dropped part")
                iid = None
            if iid is not None:
                rows.append({"inspection_id": iid, "product": job.product, "version": job.version,
                             "error": f"dropped: {why}"})
        if rows:
            try:
                self.store.record_shadows(rows)
            except Exception:  # noqa: BLE001 - counted in memory all the same
                log.exception("shadow: could not record %d dropped part(s)", len(rows))
        return len(rows)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: the part being scored finishes, parts still queued are recorded as dropped."""
        self._closed = True
        t = self._thread
        if t is not None:
            while True:  # make room for the stop sign; whatever is taken out is a drop
                try:
                    self._q.put_nowait(None)
                    break
                except queue.Full:
                    try:
                        job = self._q.get_nowait()
                    except queue.Empty:
                        continue
                    if job is not None:
                        self._drop(job, "the station closed")
                        with self._cond:
                            self._pending -= 1
                            self._cond.notify_all()
            t.join(timeout)
        self.flush_drops()


__all__ = ["DEFAULT_QUEUE", "ShadowJob", "ShadowWorker"]
