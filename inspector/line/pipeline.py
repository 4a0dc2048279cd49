"""Trigger -> frame -> inspection -> verdict, one inspection per part, with a bounded queue.

Two threads, so that the camera is never starved while the model works:

* **acquisition** reads frames from the :class:`~inspector.cameras.camera.Camera` (one frame per trigger
  in trigger mode, every frame in free-run) and puts them on a bounded queue. When the queue is
  full the part is **dropped**: counted, recorded in the store (verdict ERROR, error
  ``"dropped: ..."``) and published as an ERROR verdict with its frame id, so that the reject gate
  treats it as not inspected instead of letting it pass. (A free-running camera delivers frames
  whether or not a part is there: its dropped frames are counted, not published as parts.)
* **inspection** takes frames off the queue, scores them with the active product through
  :meth:`inspector.station.service.StationService.inspect` (which records the result: the source string carries
  the camera, frame id and device timestamp), and publishes a :class:`LineVerdict`.

**Evidence images.** The station keeps inspected images as evidence for the learning loop
(:mod:`inspector.products.feedback.images`); a line makes many parts, nearly all OK, so the
pipeline keeps every NG and UNCERTAIN part (what operators review and decide) and a random
``keep_ok_fraction`` of the OK ones (the confirmed normals of a refit; random, not every n-th part,
so that a periodic line -- a multi-cavity mould, a rotary table -- is not sampled on one cavity).
Frames with verdict ERROR are not kept. A kept image is written before its row commits, on the
inspection thread: that write (a PNG of the frame, fsynced) is part of a kept part's latency.

Software triggers are matched to frames in order; a trigger whose frame does not come within
``trigger_timeout_s`` (a camera ignores triggers while it is still busy with the last one) is a
dropped part too. Latency is measured from the trigger (software: when :meth:`LinePipeline.trigger` was called;
hardware or free-run: when the frame's first packet reached this host, Aravis' system timestamp)
to the moment the verdict is published. Listeners (OPC UA, Modbus, metrics) get every verdict
through ``on_verdict``; they must return quickly (they hand work to their own threads).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from inspector.batch.common import error_row
from inspector.cameras.base import Frame
from inspector.cameras.camera import Camera
from inspector.verdict import ERROR

log = logging.getLogger(__name__)
COUNTERS = ("OK", "UNCERTAIN", "NG", "ERROR", "dropped")


@dataclass
class LineVerdict:
    """One part's outcome, as sent to the line controller."""

    part: int                      # running part number of this pipeline (1, 2, ...)
    product: str
    verdict: str                   # OK / UNCERTAIN / NG / ERROR (dropped parts: ERROR)
    score: float | None
    frame_id: int | None           # the camera's frame (block) id
    device_timestamp_ns: int | None
    inspection_id: int | None      # row in the store
    latency_s: float               # trigger -> verdict published
    error: str | None = None
    dropped: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Job:
    frame: Frame
    t_trigger: float  # time.monotonic() of the trigger


Listener = Callable[[LineVerdict], None]


class VerdictLog:
    """A pipeline listener that keeps every verdict in order and lets a caller wait for the
    n-th one (tests, the line bench, a supervising script)."""

    def __init__(self):
        self.items: list[LineVerdict] = []
        self.cv = threading.Condition()

    def __call__(self, v: LineVerdict) -> None:
        with self.cv:
            self.items.append(v)
            self.cv.notify_all()

    def wait(self, n: int, timeout: float = 60.0) -> list[LineVerdict]:
        """All verdicts so far once there are at least ``n``; TimeoutError otherwise."""
        with self.cv:
            if not self.cv.wait_for(lambda: len(self.items) >= n, timeout):
                raise TimeoutError(f"{len(self.items)} of {n} verdicts after {timeout} s")
            return list(self.items)

    def __len__(self) -> int:
        with self.cv:
            return len(self.items)


@dataclass
class LinePipeline:
    """See module docstring. ``station`` is an :class:`inspector.station.service.StationService`."""

    station: object
    product: str
    camera: Camera
    queue_size: int = 4
    save_heatmaps: bool = False
    runtime: str = "torch"
    #: software-trigger frames that do not come within this long count as dropped
    trigger_timeout_s: float = 5.0
    listeners: list[Listener] = field(default_factory=list)
    #: free-run only: called with the product for each frame dropped (no part verdict is published)
    drop_listeners: list[Callable[[str], None]] = field(default_factory=list)
    #: share of OK parts whose image is kept as evidence (NG and UNCERTAIN: always; ERROR: never)
    keep_ok_fraction: float = 0.1
    #: seed of the OK sample (None: a fresh one per pipeline)
    keep_seed: int | None = None

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if not 0.0 <= self.keep_ok_fraction <= 1.0:
            raise ValueError(f"keep_ok_fraction must lie in [0, 1], got {self.keep_ok_fraction}")
        self._keep_rng = random.Random(self.keep_seed)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.model_ready = False
        self.last: LineVerdict | None = None
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=self.queue_size)
        self._pending: deque[float] = deque()  # software trigger times still waiting for their frame
        self._lock = threading.Lock()
        self._parts = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._product_lock = threading.Lock()

    # ---- control ---------------------------------------------------------------------------
    def start(self) -> LinePipeline:
        self.set_product(self.product)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._acquire, name="line-acquire", daemon=True),
                         threading.Thread(target=self._inspect, name="line-inspect", daemon=True),
                         threading.Thread(target=self._watchdog, name="line-watchdog", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        try:
            self.camera.source.close()  # first the source: unblocks a reader waiting for a trigger
        except Exception:  # noqa: BLE001
            pass
        self.camera.close()  # (takes the camera's lock, which that reader held)
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def set_product(self, name: str) -> str:
        """Switch the active product (loads its model first; unknown names raise KeyError)."""
        reg = self.station.registry
        prod = reg.get(name)  # ProductNotFound (a KeyError) for unknown products
        reg.runtime(prod, self.runtime)
        with self._product_lock:
            self.product, self.model_ready = prod.name, True
        log.info("line: active product %s (model %s)", prod.name, prod.version)
        return prod.name

    def trigger(self) -> bool:
        """A part is at the camera: send a software trigger. Returns False (and reports the part
        as dropped) when the camera cannot take it."""
        src = self.camera.source
        t = time.monotonic()
        if not hasattr(src, "software_trigger") or not self.camera_connected:
            self._drop(None, t, f"dropped: camera not ready ({self.camera.state})")
            return False
        with self._lock:
            self._pending.append(t)
        try:
            src.software_trigger()
        except Exception as exc:  # noqa: BLE001 - camera gone: the part is not inspected
            with self._lock:
                if self._pending and self._pending[-1] == t:
                    self._pending.pop()
            self._drop(None, t, f"dropped: trigger failed ({exc})")
            return False
        return True

    # ---- state -----------------------------------------------------------------------------
    @property
    def pending_triggers(self) -> int:
        """Software triggers sent whose frame has not arrived yet."""
        with self._lock:
            return len(self._pending)

    @property
    def queue_depth(self) -> int:
        return self._q.qsize()

    @property
    def camera_connected(self) -> bool:
        """An open camera (a triggered one may not have sent a frame yet), or a live stream."""
        is_open = getattr(self.camera.source, "is_open", None)
        return bool(is_open) if is_open is not None else self.camera.state == "live"

    @property
    def ready(self) -> bool:
        """Model loaded, camera delivering, threads running: the line may send parts."""
        return self.model_ready and self.camera_connected and any(t.is_alive() for t in self._threads)

    def status(self) -> dict:
        with self._lock:
            counts = dict(self.counts)
        return {"product": self.product, "ready": self.ready, "model_ready": self.model_ready,
                "camera": self.camera.status(), "queue_depth": self.queue_depth, "queue_size": self.queue_size,
                "counts": counts, "last": None if self.last is None else self.last.as_dict()}

    # ---- threads ---------------------------------------------------------------------------
    def _acquire(self) -> None:
        while not self._stop.is_set():
            frame = self.camera.next_frame()
            if self._stop.is_set():
                break
            self._expire_triggers()
            if not frame.ok:
                if frame.state == "reconnecting":
                    self._stop.wait(0.1)  # Camera paces reopening; do not spin
                continue
            with self._lock:
                t = self._pending.popleft() if self._pending else _arrival(frame)
            try:
                self._q.put_nowait(_Job(frame, t))
            except queue.Full:
                self._drop(frame, t, f"dropped: inspection queue full ({self.queue_size} waiting)")

    def _watchdog(self) -> None:
        # A trigger the camera never answered (busy, or gone) must still end in a verdict, even
        # while no frame comes at all: the acquisition thread is then blocked waiting for one.
        while not self._stop.wait(0.1):
            self._expire_triggers()

    def _expire_triggers(self) -> None:
        now, lost = time.monotonic(), []
        with self._lock:
            while self._pending and now - self._pending[0] > self.trigger_timeout_s:
                lost.append(self._pending.popleft())
        for t in lost:
            self._drop(None, t, f"dropped: no frame within {self.trigger_timeout_s:g} s of the trigger")

    def _inspect(self) -> None:
        while True:
            job = self._q.get()
            if job is None or self._stop.is_set():
                return
            with self._product_lock:
                product = self.product
            frame, meta = job.frame, job.frame.meta or {}
            try:
                rec = self.station.inspect(product, frame.image, source=_source(self.camera, frame),
                                           runtime=self.runtime, save_heatmap_png=self.save_heatmaps,
                                           keep_image=self.keep_image)
                verdict = str(rec.verdict) if rec.verdict is not None else ERROR
                out = (verdict, rec.score, rec.id, rec.error)
            except Exception as exc:  # noqa: BLE001 - one bad part never stops the line
                log.exception("line: inspection failed")
                out = (ERROR, None, None, f"inspection failed: {exc}")
            self._publish(LineVerdict(0, product, out[0], out[1], meta.get("frame_id"),
                                      meta.get("device_timestamp_ns"), out[2],
                                      time.monotonic() - job.t_trigger, out[3]))

    def keep_image(self, verdict) -> bool:
        """Whether a part with this verdict has its image kept as evidence (see the module
        docstring): NG and UNCERTAIN always, OK with probability ``keep_ok_fraction``, else never."""
        v = str(verdict)
        if v in ("NG", "UNCERTAIN"):
            return True
        if v != "OK" or self.keep_ok_fraction <= 0.0:
            return False
        return self.keep_ok_fraction >= 1.0 or self._keep_rng.random() < self.keep_ok_fraction

    @property
    def triggered(self) -> bool:
        """One frame per part (trigger mode), as opposed to a free-running stream."""
        settings = getattr(self.camera.source, "settings", None)
        return getattr(settings, "trigger", "free-run") != "free-run"

    def _drop(self, frame: Frame | None, t: float, reason: str) -> None:
        meta = (frame.meta if frame is not None else None) or {}
        with self._product_lock:
            product = self.product
        if frame is not None and not self.triggered:
            # Free-run: frames arrive whether or not a part is there; those the station cannot
            # take are counted (Counters/Dropped, metrics) but are no part verdicts for the PLC.
            with self._lock:
                self.counts["dropped"] += 1
            for fn in list(self.drop_listeners):
                fn(product)
            return
        rid = None
        try:
            prod = self.station.registry.get(product)
            rid = self.station.store.record_inspection(
                **error_row(prod.name, prod.version, _source(self.camera, frame), reason))
        except Exception:  # noqa: BLE001 - the count and the published verdict still report it
            log.exception("line: could not record a dropped part")
        log.warning("line: part dropped (frame %s): %s", meta.get("frame_id"), reason)
        self._publish(LineVerdict(0, product, ERROR, None, meta.get("frame_id"), meta.get("device_timestamp_ns"),
                                  rid, time.monotonic() - t, reason, dropped=True))

    def _publish(self, v: LineVerdict) -> None:
        with self._lock:
            self._parts += 1
            v.part = self._parts
            self.counts["dropped" if v.dropped else v.verdict] += 1
            self.last = v
        for fn in list(self.listeners):
            try:
                fn(v)
            except Exception:  # noqa: BLE001
                log.exception("line: verdict listener %r failed", fn)


def _arrival(frame: Frame) -> float:
    """The frame's arrival on this host (Aravis system timestamp, wall clock) on the monotonic clock."""
    ts = (frame.meta or {}).get("system_timestamp_ns")
    if not ts:
        return time.monotonic()
    age = max(0.0, time.time() - ts / 1e9)
    return time.monotonic() - age


def _source(camera: Camera, frame: Frame | None) -> str:
    """``line:<camera>/frame=<id>/ts=<device ns>``: the record points at the exact buffer (a source
    without frame ids: ``line:<camera>/<frame name>``; no frame: ``line:<camera>/no-frame``)."""
    meta = (frame.meta if frame is not None else None) or {}
    s = f"line:{camera.source.short}"
    if meta.get("frame_id") is not None:
        s += f"/frame={meta['frame_id']}/ts={meta.get('device_timestamp_ns')}"
    elif frame is not None and frame.name:
        s += f"/{frame.name}"
    else:
        s += "/no-frame"
    return s


def latency_stats(latencies_s: list[float] | np.ndarray) -> dict:
    """p50/p90/p99/max in milliseconds (numpy's linear-interpolated percentiles)."""
    a = np.asarray(latencies_s, dtype=float) * 1e3
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "max_ms": float(a.max()), "mean_ms": float(a.mean())}


__all__ = ["COUNTERS", "LinePipeline", "LineVerdict", "latency_stats"]
