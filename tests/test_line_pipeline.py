"""Trigger -> verdict pipeline on the real fake GigE Vision camera and a real (tiny) product."""

from __future__ import annotations

import threading
import time

import pytest
from _line_fakecam import fake_camera
from _line_station import make_station
from conftest import deadline, timeout_mark

from inspector.cameras.camera import Camera
from inspector.line.pipeline import LinePipeline, VerdictLog, latency_stats

pytestmark = [timeout_mark(180), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    return make_station(tmp_path_factory.mktemp("line"))


def _camera(device_id: str, **kw) -> Camera:
    from inspector.cameras.genicam import GenICamSettings, GenICamSource

    s = GenICamSettings(trigger="software", self_trigger=False, roi=(0, 0, 64, 64), timeout_s=0.5, **kw)
    return Camera(GenICamSource(device_id, s), backoff=0.2, max_backoff=0.5)


def _wait(pred, timeout=30.0):
    """``pred()`` once true or ``deadline(timeout)`` s have passed."""
    until = time.monotonic() + deadline(timeout)
    while time.monotonic() < until and not pred():
        time.sleep(0.02)
    return pred()


def test_one_verdict_per_trigger_recorded_with_frame_id(station):
    with fake_camera() as fake:
        got = VerdictLog()
        pipe = LinePipeline(station, "pa", _camera(fake.device_id), queue_size=2, listeners=[got],
                            trigger_timeout_s=deadline(5.0)).start()  # a frame late under load is no drop
        try:
            assert _wait(lambda: pipe.ready), pipe.status()
            for i in range(4):
                assert pipe.trigger()
                got.wait(i + 1, timeout=deadline(60))
        finally:
            pipe.stop()
    vs = got.items
    assert [v.part for v in vs] == [1, 2, 3, 4]
    fids = [v.frame_id for v in vs]
    assert fids == list(range(fids[0], fids[0] + 4))  # one frame per trigger, none lost or doubled
    assert all(v.verdict in ("OK", "UNCERTAIN", "NG") and v.score is not None and not v.dropped for v in vs)
    assert all(v.latency_s > 0 for v in vs)
    rows = {r["id"]: r for r in station.history(limit=100)}
    for v in vs:
        row = rows[v.inspection_id]
        assert row["verdict"] == v.verdict and f"/frame={v.frame_id}/ts={v.device_timestamp_ns}" in row["source"]
    assert pipe.counts["dropped"] == 0 and sum(pipe.counts.values()) == 4


class SlowStation:
    """The real station, but its first inspection waits for ``release`` (a model that stalls)."""

    def __init__(self, station):
        self._s, self.entered, self.release = station, threading.Event(), threading.Event()
        self.registry, self.store = station.registry, station.store

    def inspect(self, *a, **kw):
        self.entered.set()
        assert self.release.wait(deadline(60))
        return self._s.inspect(*a, **kw)


def test_full_queue_drops_are_counted_recorded_and_published(station):
    slow = SlowStation(station)
    with fake_camera() as fake:
        got = VerdictLog()
        pipe = LinePipeline(slow, "pa", _camera(fake.device_id), queue_size=1, listeners=[got],
                            trigger_timeout_s=deadline(5.0)).start()  # a frame late under load is no drop
        try:
            assert _wait(lambda: pipe.ready), pipe.status()
            assert pipe.trigger() and slow.entered.wait(deadline(30))  # part 1: being inspected
            assert pipe.trigger() and _wait(lambda: pipe.queue_depth == 1)  # part 2: waiting
            for n in (1, 2):                                           # parts 3, 4: queue full
                assert pipe.trigger() and _wait(lambda n=n: pipe.counts["dropped"] == n)
            slow.release.set()
            vs = got.wait(4, timeout=deadline(60))
        finally:
            slow.release.set()
            pipe.stop()
    dropped = [v for v in vs if v.dropped]
    inspected = [v for v in vs if not v.dropped]
    assert len(dropped) == 2 and len(inspected) == 2
    assert all(v.verdict == "ERROR" and "queue full" in v.error and v.frame_id is not None for v in dropped)
    assert sorted(v.frame_id for v in vs) == list(range(min(v.frame_id for v in vs), min(v.frame_id for v in vs) + 4))
    assert pipe.counts["dropped"] == 2 and pipe.counts["ERROR"] == 0
    rows = {r["id"]: r for r in station.history(limit=200)}
    for v in dropped:  # reported in the store too, with the frame it concerned
        assert rows[v.inspection_id]["verdict"] == "ERROR" and "queue full" in rows[v.inspection_id]["error"]
        assert f"/frame={v.frame_id}/" in rows[v.inspection_id]["source"]


def test_every_trigger_ends_in_a_verdict_even_when_the_camera_skips_it(station):
    """Triggers faster than the camera's frame period: the camera ignores some; each of those
    still ends as a dropped part (after trigger_timeout_s), none is silently lost."""
    with fake_camera() as fake:
        got = VerdictLog()
        pipe = LinePipeline(station, "pa", _camera(fake.device_id), queue_size=8, trigger_timeout_s=deadline(1.0),
                            listeners=[got]).start()
        try:
            assert _wait(lambda: pipe.ready), pipe.status()
            for _ in range(5):
                assert pipe.trigger()  # back to back, well inside one frame period (40 ms)
            vs = got.wait(5, timeout=deadline(90))
            time.sleep(1.5)  # a quiet window (the thing under test): nothing more may come, one verdict per trigger
            assert len(got.items) == 5 and pipe.pending_triggers == 0
        finally:
            pipe.stop()
    inspected = [v for v in vs if not v.dropped]
    dropped = [v for v in vs if v.dropped]
    assert len(inspected) >= 1 and len(inspected) + len(dropped) == 5
    assert all("no frame within" in v.error for v in dropped)
    assert pipe.counts["dropped"] == len(dropped)


def test_trigger_without_camera_is_a_dropped_part(station):
    with fake_camera() as fake:
        got = VerdictLog()
        pipe = LinePipeline(station, "pa", _camera(fake.device_id + "-absent"), listeners=[got]).start()
        try:
            assert not _wait(lambda: pipe.ready, 2.0)  # a quiet window: never ready without its camera
            assert pipe.model_ready and not pipe.camera_connected
            assert pipe.trigger() is False
            v = got.wait(1, timeout=deadline(60))[0]
        finally:
            pipe.stop()
    assert v.dropped and v.verdict == "ERROR" and "camera not ready" in v.error
    assert pipe.counts == {"OK": 0, "UNCERTAIN": 0, "NG": 0, "ERROR": 0, "dropped": 1}


def test_switch_product(station):
    from inspector.products.product import ProductNotFound

    pipe = LinePipeline(station, "pa", Camera(_NoCamera()))
    assert pipe.set_product("pb") == "pb" and pipe.product == "pb"
    with pytest.raises(ProductNotFound):
        pipe.set_product("nope")
    assert pipe.product == "pb"
    assert issubclass(ProductNotFound, KeyError)  # what the OPC UA method maps to BadInvalidArgument


class _NoCamera:
    label = short = "none"

    def open(self):
        from inspector.cameras.base import SourceLost

        raise SourceLost("none")

    def close(self):
        pass


def test_latency_stats_match_numpy_definition():
    import numpy as np

    lat = np.random.default_rng(1).gamma(2.0, 0.02, 1000)
    s = latency_stats(lat)
    ref = np.sort(lat * 1e3)
    # linear interpolation between closest ranks (numpy's default), written out
    k = (len(ref) - 1) * 0.99
    lo, hi = int(np.floor(k)), int(np.ceil(k))
    assert s["p99_ms"] == pytest.approx(ref[lo] + (ref[hi] - ref[lo]) * (k - lo))
    assert s["p50_ms"] == pytest.approx(np.median(ref)) and s["n"] == 1000
