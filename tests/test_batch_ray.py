"""Batch scoring on a real local Ray instance (2 CPUs, small object store, started here):
the same scores as the local engine, bad files recorded, a killed scoring actor and a killed
driver neither lose nor duplicate a result, and the Parquet results dataset holds each file once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import deadline, kill_after_rows

from inspector.batch.common import batch_id_for
from inspector.batch.local import run_batch
from inspector.io import write_image
from inspector.station.service import StationService
from inspector.station.store import Store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for this module. Its workers inherit PYTHONPATH (this checkout) and
    one OpenMP thread from the environment set here, and run at the test's own priority: Ray starts
    workers at nice 15 by default, which on a machine busy with other jobs leaves them a few percent
    of a core, so their start-up (importing torch, loading the model) outlasts any sane deadline."""
    import ray

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAY_ADDRESS", "RAY_worker_niceness")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["RAY_worker_niceness"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def station(tmp_path_factory, brick_crops):
    st = StationService(tmp_path_factory.mktemp("ray") / "data", device="cpu")
    st.registry.register("brick", brick_crops(2, 96, seed=0), detector="patchcore", backbone="tiny-cnn",
                         image_size=64, n_synthetic=2)
    return st


def _folder(folder: Path, brick_crops, n: int, seed: int) -> list[Path]:
    return [write_image(folder / f"img{i:04d}.png", c) for i, c in enumerate(brick_crops(n, 64, seed=seed))]


def _parquet(out_dir: str) -> pa.Table:
    return pads.dataset(str(Path(out_dir) / "results"), format="parquet").to_table()


def _scorer_pids() -> list[int]:
    """PIDs of this Ray instance's scoring actors (their process title names the Ray Data stage)."""
    import ray._private.worker as rw

    raylet = rw._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "MapBatches(Scorer)" in cmd and ppid == raylet:
            pids.append(int(d.name))
    return pids


def test_upsert_is_idempotent_per_batch_path_and_sha(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    row = dict(product="p", source="/a.png", image_sha256="s1", score=1.0, verdict="OK", model_version="v",
               batch_id="b")
    assert store.upsert_batch_results([row, dict(row, source="/b.png")]) == 2
    assert store.upsert_batch_results([row]) == 0  # a retried task: nothing changes
    assert store.count(batch_id="b") == 2
    assert store.upsert_batch_results([dict(row, image_sha256="s2", score=2.0)]) == 1  # file replaced
    rows = {r["source"]: r for r in store.history(batch_id="b", limit=None)}
    assert len(rows) == 2 and rows["/a.png"]["score"] == 2.0 and rows["/a.png"]["image_sha256"] == "s2"
    err = dict(product="p", source="/c.png", image_sha256=None, verdict="ERROR", error="empty file", model_version="v",
               batch_id="b")
    assert store.upsert_batch_results([err]) == 1 and store.upsert_batch_results([err]) == 0
    assert store.count(batch_id="b") == 3


def test_ray_manifest_scores_like_local_engine_and_records_bad_files(ray_cluster, station, brick_crops, tmp_path):
    from inspector.batch.ray import run_batch_ray

    folder = tmp_path / "imgs"
    files = _folder(folder, brick_crops, 10, seed=1)
    (folder / "img0004b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # a bad file in the middle
    (folder / "img0007b.jpg").write_bytes(b"")
    rel = sorted(p.name for p in folder.iterdir()) + ["missing.png"]
    manifest = folder / "list.parquet"
    pq.write_table(pa.table({"path": rel, "line": ["L1"] * len(rel)}), manifest)  # paths relative to the manifest
    s = run_batch_ray(manifest, "brick", station.registry, station.store, workers=2, batch_size=3, progress=False,
                      heatmaps="flagged")
    assert (s.n_files, s.n_new, s.n_scored, s.n_errors) == (13, 13, 10, 3)
    rows = {Path(r["source"]).name: r for r in station.store.history(batch_id=s.batch_id, limit=None)}
    assert "empty file" in rows["img0007b.jpg"]["error"] and "not a decodable image" in rows["img0004b.png"]["error"]
    assert "not found" in rows["missing.png"]["error"] and rows["missing.png"]["verdict"] == "ERROR"
    local = run_batch(folder, "brick", station.registry, station.store, batch_size=4, progress=False, resume=False,
                      heatmaps="none", report=False)
    ref = {Path(r["source"]).name: r for r in station.store.history(batch_id=local.batch_id, limit=None)}
    for p in files:
        assert rows[p.name]["score"] == pytest.approx(ref[p.name]["score"], rel=1e-5, abs=1e-7)
        assert rows[p.name]["verdict"] == ref[p.name]["verdict"]
        assert rows[p.name]["image_sha256"] == ref[p.name]["image_sha256"]
        if rows[p.name]["verdict"] != "OK":
            assert Path(rows[p.name]["heatmap_path"]).is_file()
    table = _parquet(s.out_dir)
    assert sorted(table.column("source").to_pylist()) == sorted(r["source"] for r in rows.values())
    assert Path(s.csv_path).is_file() and "Files not scored (3)" in Path(s.html_path).read_text()


def test_killed_scoring_actor_mid_run_loses_and_duplicates_nothing(ray_cluster, station, brick_crops, tmp_path):
    from inspector.batch.ray import run_batch_ray

    folder = tmp_path / "kill-worker"
    files = _folder(folder, brick_crops, 60, seed=2)
    bid = batch_id_for(folder, "brick", station.registry.get("brick").version)
    watcher = Store(station.store.url)
    result, killed = {}, []

    def run():
        result["s"] = run_batch_ray(folder, "brick", station.registry, station.store, workers=1, batch_size=2,
                                    progress=False, heatmaps="none")

    t = threading.Thread(target=run)
    t.start()
    until = time.monotonic() + deadline(240)
    while not killed and t.is_alive() and time.monotonic() < until:
        if watcher.count(batch_id=bid) >= 4:
            for pid in _scorer_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, watcher.count(batch_id=bid)))
        time.sleep(0.02)
    t.join(timeout=deadline(300))
    assert not t.is_alive()
    assert killed and killed[0][1] < len(files), killed  # really killed mid-run
    s = result["s"]
    rows = watcher.history(batch_id=bid, limit=None)
    sources = [r["source"] for r in rows]
    assert len(sources) == len(set(sources)) == len(files) == s.n_new
    assert all(r["verdict"] != "ERROR" for r in rows)
    table = _parquet(s.out_dir)
    assert sorted(table.column("source").to_pylist()) == sorted(sources)  # once each
    assert len(set(table.column("worker").to_pylist()) - {None}) >= 2  # the killed actor and its replacement


def test_killed_driver_then_rerun_from_the_station_resumes(ray_cluster, station, brick_crops, tmp_path):
    folder = tmp_path / "kill-driver"
    files = _folder(folder, brick_crops, 40, seed=3)
    (folder / "img0020x.png").write_bytes(b"not an image")
    bid = batch_id_for(folder, "brick", station.registry.get("brick").version)
    watcher = Store(station.store.url)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    scorers_before = set(_scorer_pids())
    proc = subprocess.Popen([sys.executable, "-m", "inspector", "batch", str(folder), "--product", "brick",
                             "--data-dir", str(station.data_dir), "--engine", "ray", "--address", ray_cluster,
                             "--workers", "1", "--batch-size", "2", "--heatmaps", "none", "--no-progress",
                             "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # started: this batch's scoring actor is up (the driver's and Ray's start-up is behind it)
    kill_after_rows(proc, watcher, bid, 4, timeout=180, started=lambda: set(_scorer_pids()) - scorers_before)
    partial = watcher.count(batch_id=bid)
    assert 4 <= partial < len(files) + 1, partial
    # the rerun comes from the station's Batch tab, configured to submit to this Ray cluster
    from app.shell import StationApp
    from inspector.station.config import StationConfig

    cfg = StationConfig.load(env={"INSPECTOR_RAY_ADDRESS": ray_cluster, "INSPECTOR_BATCH_ROOTS": str(tmp_path)})
    assert cfg.ray_address == ray_cluster
    t_rerun = datetime.now(UTC)
    msg, _, reports = StationApp(station, cfg).on_batch("brick", str(folder), zip_path=None,
                                                       progress=lambda *a, **k: None)
    rows = watcher.history(batch_id=bid, limit=None)
    sources = [r["source"] for r in rows]
    assert len(sources) == len(set(sources)) == len(files) + 1  # exactly once each, the bad file included
    old = sum(r["created_at"] < t_rerun for r in rows)  # kept from the killed run, not scored again
    assert f"`{bid}`" in msg and partial <= old < len(sources), (partial, old, msg)
    assert sum(r["verdict"] == "ERROR" for r in rows) == 1 and len(reports) == 2
    table = _parquet(station.data_dir / "batches" / bid)  # the killed run's committed rows were filled in
    assert sorted(table.column("source").to_pylist()) == sorted(sources)
