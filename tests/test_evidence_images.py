"""The evidence image store: content-addressed, a disk budget never exceeded (one writer, many
threads, two processes), undecided images rolled over oldest first, kept ones never, an image that
cannot fit dropped and counted, no torn file after kill -9; and every path keeping its images
under the sha its row records (station inspect, local and Ray batches, the line's keep policy)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SLOWDOWN as SLOW
from conftest import brick_station, random_crop

from inspector.io import write_image
from inspector.products.feedback.images import EvidenceFull, EvidenceImages, gb_to_bytes
from inspector.state import array_sha256, bytes_sha256, file_sha256

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

pytestmark = [pytest.mark.timeout(int(300 * SLOW)), pytest.mark.usefixtures("one_torch_thread")]


def _blob(rng: np.random.Generator, n: int) -> tuple[bytes, str]:
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return data, bytes_sha256(data)


def disk_bytes(root: Path) -> int:
    """Image bytes on disk under the store (objects and writes under way), each inode once: a
    file renamed from tmp/ into objects/ while the walk runs is not counted twice."""
    seen: dict[tuple[int, int], int] = {}
    for sub in ("objects", "tmp"):
        for dirpath, _, files in os.walk(root / sub):
            for f in files:
                try:
                    st = os.stat(os.path.join(dirpath, f))
                except FileNotFoundError:
                    continue
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def stored_files(root: Path) -> dict[str, Path]:
    return {p.name: p for p in (root / "objects").glob("*/*") if not p.name.endswith(".kept")}


def assert_whole(root: Path) -> None:
    """Every stored file is whole: its content hashes to its name (bytes are stored as given)."""
    for name, p in stored_files(root).items():
        assert file_sha256(p) == name, f"torn or foreign file {p}"


def _writing(root: Path, full: int) -> bool:
    """A write under way: a temp file with some bytes in it (or an image file short of ``full``
    bytes, which a store writing in place would show)."""
    for p in [*(root / "tmp").iterdir(), *(root / "objects").glob("*/*")]:
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            continue
        if size > 0 and (p.parent.name == "tmp" or size < full):
            return True
    return False


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout * SLOW
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


# ---------------------------------------------------------------------------------------------
# The store alone
# ---------------------------------------------------------------------------------------------
def test_put_read_keep_and_content_address(tmp_path, brick):
    ev = EvidenceImages(tmp_path / "evidence", 10**8)
    data, sha = _blob(np.random.default_rng(0), 5000)
    assert ev.put(data, sha) and ev.has(sha) and ev.path(sha).read_bytes() == data
    assert ev.path(sha).parent.name == sha[:2]  # sharded
    rgb = random_crop(brick, np.random.default_rng(1), 40)
    asha = array_sha256(rgb)
    assert ev.put(rgb, asha) and np.array_equal(ev.read(asha), rgb)  # an array: a lossless PNG
    assert not ev.is_kept(sha) and ev.keep(sha) and ev.is_kept(sha)
    mask = np.zeros((30, 40), bool)
    mask[5:12, 3:30] = True
    msha = ev.put_mask(mask)
    assert ev.is_kept(msha) and np.array_equal(ev.read_mask(msha), mask)
    assert ev.put_mask(mask.astype(np.uint8) * 255) == msha  # content-addressed: the same PNG
    u = ev.usage()
    assert (u["files"], u["kept"], u["pending"], u["dropped"]) == (3, 2, 1, 0)
    assert u["bytes"] == disk_bytes(ev.root)
    assert not ev.keep("0" * 64) and not ev.has("0" * 64)
    with pytest.raises(KeyError):
        ev.read("0" * 64)
    for bad in ("../../etc/passwd", sha.upper(), sha[:-1]):
        with pytest.raises(ValueError):
            ev.put(data, bad)


def test_budget_never_exceeded_over_many_puts_and_oldest_undecided_roll_over_first(tmp_path):
    max_bytes = 20_000
    ev = EvidenceImages(tmp_path / "evidence", max_bytes)
    rng = np.random.default_rng(0)
    order, kept, total = [], set(), 0
    for i in range(300):
        data, sha = _blob(rng, int(rng.integers(300, 3000)))
        keep = i % 97 == 5
        assert ev.put(data, sha, keep=keep)
        total += len(data)
        if keep:
            kept.add(sha)
        else:
            order.append(sha)
        assert disk_bytes(ev.root) <= max_bytes
        # what is still stored is every kept image plus the NEWEST undecided ones (a suffix)
        pending = ev.shas(kept=False)
        assert pending == order[len(order) - len(pending):]
        assert set(ev.shas(kept=True)) == kept
    u = ev.usage()
    assert total > 10 * max_bytes and u["rolled"] == len(order) - u["pending"] > 0
    assert u["bytes"] == disk_bytes(ev.root) <= max_bytes and u["dropped"] == 0
    assert_whole(ev.root)


def test_kept_images_survive_rollover_and_release_lets_them_go(tmp_path):
    ev = EvidenceImages(tmp_path / "evidence", 10_000)
    rng = np.random.default_rng(1)
    blobs = [_blob(rng, 2000) for _ in range(4)]  # a, b, c, d: 8000 bytes
    for data, sha in blobs:
        assert ev.put(data, sha)
    a, b, c, d = (sha for _, sha in blobs)
    assert ev.keep(a)  # the oldest, decided
    e, f = _blob(rng, 2000), _blob(rng, 2000)
    assert ev.put(*e) and ev.put(*f)  # 12000 > 10000: b (oldest undecided) goes, not a
    assert ev.has(a) and not ev.has(b) and ev.has(c) and ev.has(d)
    for _ in range(10):  # a stream of new images: a stays
        assert ev.put(*_blob(rng, 2000))
    assert ev.has(a) and ev.usage()["kept"] == 1
    assert ev.release(a)
    assert ev.put(*_blob(rng, 2000)) and not ev.has(a)  # undecided again: the oldest, rolled over
    assert disk_bytes(ev.root) <= 10_000


def test_an_image_that_cannot_fit_is_dropped_counted_and_rolls_nothing_over(tmp_path):
    ev = EvidenceImages(tmp_path / "evidence", 10_000)
    rng = np.random.default_rng(2)
    small = [_blob(rng, 3000) for _ in range(3)]
    for blob in small:
        assert ev.put(*blob)
    assert not ev.put(*_blob(rng, 10_001))  # larger than the whole budget
    assert all(ev.has(sha) for _, sha in small)  # nothing rolled over for it
    assert ev.keep(small[0][1]) and ev.keep(small[1][1]) and ev.keep(small[2][1])
    big = _blob(rng, 2000)  # fits the budget, but the budget is full of kept images
    assert not ev.put(*big) and not ev.has(big[1])
    u = ev.usage()
    assert u["dropped"] == 2 and u["rolled"] == 0 and u["files"] == 3
    with pytest.raises(EvidenceFull):
        ev.put_mask(rng.integers(0, 2, (80, 80)))
    assert disk_bytes(ev.root) <= 10_000
    off = EvidenceImages(tmp_path / "off", gb_to_bytes(0))  # evidence_max_gb = 0: keeping off
    assert not off.put(*big) and off.usage()["dropped"] == 0 and not (tmp_path / "off").exists()


def test_index_is_rebuilt_from_the_files_when_lost_or_corrupt(tmp_path):
    root = tmp_path / "evidence"
    ev = EvidenceImages(root, 50_000)
    rng = np.random.default_rng(3)
    blobs = [_blob(rng, 1000) for _ in range(6)]
    for i, blob in enumerate(blobs):
        assert ev.put(*blob, keep=i in (1, 4))
    before = ev.usage()
    (root / "index.sqlite").unlink()
    ev2 = EvidenceImages(root, 50_000)
    after = ev2.usage()
    assert {k: after[k] for k in ("bytes", "files", "kept", "pending")} == \
        {k: before[k] for k in ("bytes", "files", "kept", "pending")}
    assert set(ev2.shas(kept=True)) == {blobs[1][1], blobs[4][1]}
    (root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    ev3 = EvidenceImages(root, 3_000)  # rebuilt, and a lowered budget: undecided roll over to fit
    u = ev3.usage()
    assert u["kept"] == 2 and u["bytes"] == disk_bytes(root) <= 3_000


_WRITER = r"""
import sys, threading
import numpy as np
from inspector.products.feedback.images import EvidenceImages
from inspector.state import bytes_sha256
root, max_bytes, threads, puts, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ev = EvidenceImages(root, max_bytes)
def work(k):
    rng = np.random.default_rng(seed * 100 + k)
    for i in range(puts):
        data = rng.integers(0, 256, int(rng.integers(500, 8000)), dtype=np.uint8).tobytes()
        ev.put(data, bytes_sha256(data), keep=bool(rng.random() < 0.03))
ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print("done", flush=True)
"""


def test_budget_holds_with_concurrent_writers_in_threads_and_two_processes(tmp_path):
    """Four threads here and three in another process put into one store. A monitor samples the
    bytes on disk under the store's lock: no budget decision is made meanwhile, so nothing is
    rolled over during a sample and each sample is at most the bytes reserved, never an overcount."""
    max_bytes, puts = 60_000, 40
    root = tmp_path / "evidence"
    ev = EvidenceImages(root, max_bytes)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(max_bytes), "3", str(puts), "7"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors, peak = [], [0]
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            with ev._locked():
                peak[0] = max(peak[0], disk_bytes(root))
            stop.wait(0.002)

    def work(k):
        try:
            rng = np.random.default_rng(k)
            for _ in range(puts):
                data, sha = _blob(rng, int(rng.integers(500, 8000)))
                ev.put(data, sha, keep=bool(rng.random() < 0.03))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    mon = threading.Thread(target=monitor)
    mon.start()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        out, err = proc.communicate(timeout=240 * SLOW)
    finally:
        stop.set()
        mon.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "done" in out, err[-3000:]
    assert not errors, errors
    u = ev.usage()
    assert 0 < peak[0] <= max_bytes
    assert u["bytes"] == disk_bytes(root) <= max_bytes and u["reserved_bytes"] == 0
    assert u["rolled"] > 0  # 7 writers x 40 puts of ~4 KB: many times the budget went through
    assert u["files"] == len(stored_files(root)) and not list((root / "tmp").iterdir())
    assert_whole(root)


_KILLED_WRITER = r"""
import os, sys
from inspector.products.feedback.images import EvidenceImages
from inspector.state import bytes_sha256
ev = EvidenceImages(sys.argv[1], 10**9)
while True:
    data = os.urandom(int(sys.argv[2]))
    ev.put(data, bytes_sha256(data))
"""


def test_kill_9_during_put_leaves_no_torn_file(tmp_path):
    """SIGKILL a process in the middle of writing an image (its temp file exists): no file under
    an image's name is ever partial, and the next opener removes the leftovers and the dead
    writer's reservation."""
    root = tmp_path / "evidence"
    EvidenceImages(root, 10**9)
    torn_seen, full = 0, 48 * 1024 * 1024
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root), str(full)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait(lambda p=proc: p.poll() is not None or _writing(root, full), 120, "a write under way")
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30 * SLOW)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        torn_seen += any((root / "tmp").iterdir())  # the half-written image is there, under a temp name
        assert_whole(root)
        ev = EvidenceImages(root, 10**9)  # opening cleans up after the dead writer
        assert not list((root / "tmp").iterdir())
        u = ev.usage()
        assert u["reserved_bytes"] == 0 and u["bytes"] == disk_bytes(root) and u["files"] == len(stored_files(root))
        if torn_seen:
            break
    assert torn_seen, "no kill landed in the middle of a write in 5 tries"


# ---------------------------------------------------------------------------------------------
# Every path keeps its images under the sha its row records
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def station(tmp_path_factory, brick):
    return brick_station(tmp_path_factory, brick, "evidence")


def test_station_inspect_keeps_the_image_under_the_rows_sha_before_the_row(station, brick, tmp_path, monkeypatch):
    ev = station.evidence_images
    at_record = []
    record = station.store.record_inspection

    def spy(**row):  # the image must be in the store when its row is written
        sha = row.get("image_sha256")
        at_record.append(bool(sha) and ev.has(sha))
        return record(**row)

    monkeypatch.setattr(station.store, "record_inspection", spy)
    rng = np.random.default_rng(5)
    path = write_image(tmp_path / "part.png", random_crop(brick, rng, 96))
    rec = station.inspect("brick", path)
    row = station.store.get(rec.id)
    assert row["image_sha256"] == file_sha256(path)
    assert ev.path(row["image_sha256"]).read_bytes() == path.read_bytes()  # the file's own bytes
    arr = random_crop(brick, rng, 96)
    rec = station.inspect("brick", arr, source="camera:test")  # Live: an array
    row = station.store.get(rec.id)
    assert row["image_sha256"] == array_sha256(arr) and np.array_equal(ev.read(row["image_sha256"]), arr)
    bad = station.inspect("brick", b"not an image at all")  # ERROR: no image to keep
    assert bad.error and not ev.has(station.store.get(bad.id)["image_sha256"])
    assert at_record == [True, True, False]
    arr1 = random_crop(brick, rng, 96)
    declined = station.inspect("brick", arr1, keep_image=False)
    assert declined.error is None and not ev.has(array_sha256(arr1))
    policy_saw = []
    arr2 = random_crop(brick, rng, 96)
    rec = station.inspect("brick", arr2, keep_image=lambda v: policy_saw.append(v) or False)
    assert policy_saw == [rec.verdict] and not ev.has(array_sha256(arr2))


def test_keeping_off_stores_nothing(station, brick):
    from inspector.station.service import StationService

    off = StationService(station.data_dir, device="cpu", evidence_max_gb=0)
    arr = random_crop(brick, np.random.default_rng(9), 96)
    rec = off.inspect("brick", arr)
    assert rec.error is None and not off.evidence_images.has(array_sha256(arr))


def test_batch_keeps_its_images_under_the_rows_sha(station, brick, tmp_path):
    folder = tmp_path / "batch"
    rng = np.random.default_rng(6)
    files = [write_image(folder / f"img{i}.png", random_crop(brick, rng, 80)) for i in range(5)]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    s = station.batch(folder, "brick", progress=False, batch_size=2, report=False)
    assert s.n_files == 6 and s.n_errors == 1
    rows = {Path(r["source"]).name: r for r in station.store.history(batch_id=s.batch_id, limit=None)}
    ev = station.evidence_images
    for p in files:
        sha = rows[p.name]["image_sha256"]
        assert sha == file_sha256(p) and ev.path(sha).read_bytes() == p.read_bytes()
    assert not ev.has(rows["broken.png"]["image_sha256"])  # a file that does not decode is no evidence


def test_ray_decode_task_keeps_files_under_the_rows_sha(station, brick, tmp_path):
    """The Ray engine's decode task (run here as a plain function: the same code a worker runs)
    opens the evidence store from the driver's (folder, budget) and keeps what it decodes."""
    from inspector.batch.ray import _evidence_spec, decode_batch

    rng = np.random.default_rng(7)
    files = [write_image(tmp_path / f"r{i}.png", random_crop(brick, rng, 80)) for i in range(3)]
    spec = _evidence_spec(station.evidence_images)
    out = decode_batch({"path": np.array([str(p) for p in files], dtype=object)}, 64, None, False, evidence=spec)
    for p, sha in zip(files, out["sha256"]):
        assert sha == file_sha256(p) and station.evidence_images.path(sha).read_bytes() == p.read_bytes()
    assert _evidence_spec(EvidenceImages(tmp_path / "off", 0)) is None


# ---------------------------------------------------------------------------------------------
# The line's keep policy
# ---------------------------------------------------------------------------------------------
def test_line_keeps_ng_and_uncertain_and_a_sample_of_ok():
    from inspector.line.pipeline import LinePipeline

    pipe = LinePipeline(None, "p", None, keep_ok_fraction=0.2, keep_seed=0)
    assert all(pipe.keep_image(v) for v in ("NG", "UNCERTAIN") * 50)
    assert not any(pipe.keep_image("ERROR") for _ in range(50))
    n = 5000
    kept = sum(pipe.keep_image("OK") for _ in range(n))
    assert abs(kept / n - 0.2) < 0.03  # binomial sd ~0.006
    none = LinePipeline(None, "p", None, keep_ok_fraction=0.0)
    every = LinePipeline(None, "p", None, keep_ok_fraction=1.0)
    assert not any(none.keep_image("OK") for _ in range(100)) and all(every.keep_image("OK") for _ in range(100))
    with pytest.raises(ValueError):
        LinePipeline(None, "p", None, keep_ok_fraction=1.5)


def test_line_config_reads_keep_ok_fraction():
    from inspector.line.config import LineConfig
    from inspector.station.config import ConfigError, StationConfig

    assert LineConfig.from_dict({}).keep_ok_fraction == 0.1
    assert LineConfig.from_dict({"keep_ok_fraction": "0.25"}).keep_ok_fraction == 0.25
    with pytest.raises(ValueError):
        LineConfig.from_dict({"keep_ok_fraction": 2})
    assert StationConfig.load(env={}).evidence_max_gb == 2.0
    assert StationConfig.load(env={"INSPECTOR_EVIDENCE_MAX_GB": "0.5"}).evidence_max_gb == 0.5
    with pytest.raises(ConfigError):
        StationConfig.load(env={"INSPECTOR_EVIDENCE_MAX_GB": "-1"})


def test_line_pipeline_keeps_images_by_its_policy(station, brick, tmp_path):
    """A real pipeline on a replayed folder: with no OK sample only the NG/UNCERTAIN parts' images
    are kept, with the whole OK sample every part's is; each under its row's sha."""
    from inspector.cameras.camera import Camera
    from inspector.cameras.sources import FolderSource
    from inspector.line.pipeline import LinePipeline, VerdictLog

    rng = np.random.default_rng(8)
    frames = []
    for i in range(6):
        img = random_crop(brick, rng, 96).copy()
        if i % 2:  # a dark blot: some parts NG or UNCERTAIN
            img[20:60, 20:60] = 0
        frames.append(img)
    for fraction in (0.0, 1.0):
        folder = tmp_path / f"frames{fraction}"
        for i, img in enumerate(frames):
            img = img.copy()
            img[0, 0] = int(fraction)  # other frames, other shas, per run
            write_image(folder / f"f{i}.png", img)
        got = VerdictLog()
        cam = Camera(FolderSource(folder, loop=False), backoff=0.1, max_backoff=0.2)
        pipe = LinePipeline(station, "brick", cam, queue_size=16, listeners=[got], keep_ok_fraction=fraction).start()
        try:
            vs = got.wait(len(frames), timeout=120 * SLOW)
        finally:
            pipe.stop()
        assert not any(v.dropped for v in vs)
        kinds = {v.verdict for v in vs}
        assert "OK" in kinds and kinds & {"NG", "UNCERTAIN"}, kinds  # both branches of the policy ran
        for v in vs:
            sha = station.store.get(v.inspection_id)["image_sha256"]
            expect = v.verdict in ("NG", "UNCERTAIN") or (v.verdict == "OK" and fraction == 1.0)
            assert station.evidence_images.has(sha) == expect, (v.verdict, fraction)
