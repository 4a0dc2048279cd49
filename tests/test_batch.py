"""Folder batches: every file recorded (bad ones with their reason), streaming in mini-batches,
resume after Ctrl-C or kill -9 with exactly one row per file, MuSc subsets, reports."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import brick_station, deadline, kill_after_rows, random_crop

from inspector.batch.common import batch_id_for, iter_files
from inspector.batch.local import run_batch
from inspector.io import read_image, write_image
from inspector.station.store import Store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def station(tmp_path_factory, brick):
    return brick_station(tmp_path_factory, brick, "batch")


def _good_folder(folder: Path, brick, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [write_image(folder / f"img{i:04d}.png", random_crop(brick, rng)) for i in range(n)]


def _cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "inspector", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=deadline(timeout))


def test_mixed_folder_scores_good_files_and_records_each_bad_one(station, brick, tmp_path):
    folder = tmp_path / "mixed"
    good = _good_folder(folder, brick, 5)
    rng = np.random.default_rng(1)
    rgb = random_crop(brick, rng, 100)
    cv2.imwrite(str(folder / "sixteen.png"), rgb.astype(np.uint16) * 257)  # 16-bit: valid
    assert cv2.imread(str(folder / "sixteen.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    cv2.imwrite(str(folder / "sub" / "alpha.png") if (folder / "sub").mkdir() is None else "",
                np.dstack([rgb, np.full(rgb.shape[:2], 180, np.uint8)]))  # RGBA: valid
    good += [folder / "sixteen.png", folder / "sub" / "alpha.png"]
    bad = {
        "corrupt.jpg": "not a decodable image",
        "empty.png": "empty file",
        "huge.png": "image too large",
        "notes.txt": "not a decodable image",
        "truncated.png": "not a decodable image",
    }
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    (folder / "empty.png").write_bytes(b"")
    write_image(folder / "huge.png", np.zeros((200, 200, 3), np.uint8))  # 40000 px > the limit below
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "img0000.png").read_bytes()[:60])
    (folder / ".hidden.png").write_bytes(b"skipped")
    out = tmp_path / "report"
    res = _cli("batch", str(folder), "--product", "brick", "--data-dir", str(station.data_dir), "--out", str(out),
               "--batch-size", "3", "--device", "cpu", env={**ENV, "INSPECTOR_MAX_PIXELS": "20000"})
    assert res.returncode == 0, res.stderr
    bid = batch_id_for(folder, "brick", station.registry.get("brick").version)
    rows = {Path(r["source"]).relative_to(folder).as_posix(): r for r in station.store.history(batch_id=bid, limit=None)}
    assert set(rows) == {p.relative_to(folder).as_posix() for p in good} | set(bad)  # one row per file
    for p in good:
        r = rows[p.relative_to(folder).as_posix()]
        assert r["verdict"] in ("OK", "UNCERTAIN", "NG") and np.isfinite(r["score"]) and r["error"] is None
        assert Path(r["heatmap_path"]).is_file() and r["image_sha256"] and r["latency_ms"] > 0
    for name, reason in bad.items():
        assert rows[name]["verdict"] == "ERROR" and reason in rows[name]["error"], (name, rows[name]["error"])
    assert rows["empty.png"]["image_sha256"] is not None  # hashed even when undecodable
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {t["relpath"] for t in table} == set(rows)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Score histogram" in html and "Files not scored (5)" in html
    assert "image too large" in html
    assert f"batch {bid}" in res.stdout


def test_kill_9_mid_batch_then_rerun_records_each_image_exactly_once(station, brick, tmp_path, capsys):
    folder = tmp_path / "many"
    files = _good_folder(folder, brick, 240, seed=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    files.append(folder / "broken.png")
    args = ("batch", str(folder), "--product", "brick", "--data-dir", str(station.data_dir), "--batch-size", "2",
            "--heatmaps", "flagged", "--no-progress", "--device", "cpu")
    bid = batch_id_for(folder, "brick", station.registry.get("brick").version)
    watcher = Store(station.store.url)
    proc = subprocess.Popen([sys.executable, "-m", "inspector", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert kill_after_rows(proc, watcher, bid, 6, timeout=180) == -signal.SIGKILL
    partial = watcher.count(batch_id=bid)
    assert 6 <= partial < len(files), partial  # really killed mid-batch
    from inspector.cli.main import main

    assert main(list(args)) == 0  # the same command again (in this process: no second start-up)
    stdout = capsys.readouterr().out
    rows = watcher.history(batch_id=bid, limit=None)
    sources = [r["source"] for r in rows]
    assert len(sources) == len(set(sources)) == len(files)  # exactly one row per image
    assert set(sources) == {str(p.resolve()) for p in files}
    assert sum(r["verdict"] == "ERROR" for r in rows) == 1
    assert f"{len(files) - partial} recorded now, {partial} already recorded" in stdout


def test_interrupted_batch_resumes_in_process(station, brick, tmp_path):
    folder = tmp_path / "resume"
    files = _good_folder(folder, brick, 13, seed=3)
    calls = []

    def stop_after_first_commit(done, total):
        calls.append(done)
        if len(calls) == 2:  # the first mini-batch is committed; Ctrl-C now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(folder, "brick", station.registry, station.store, batch_size=4, progress=False,
                  on_progress=stop_after_first_commit)
    s = run_batch(folder, "brick", station.registry, station.store, batch_size=4, progress=False)
    assert (s.n_skipped, s.n_new, s.n_files, s.n_scored) == (4, 9, 13, 13)
    assert station.store.count(batch_id=s.batch_id) == len(files)
    again = run_batch(folder, "brick", station.registry, station.store, batch_size=4, progress=False)
    assert (again.n_new, again.n_skipped) == (0, 13) and again.batch_id == s.batch_id
    fresh = run_batch(folder, "brick", station.registry, station.store, batch_size=5, progress=False, resume=False,
                      heatmaps="none")
    assert fresh.batch_id != s.batch_id and fresh.n_new == 13
    a = {r["source"]: r["score"] for r in station.store.history(batch_id=s.batch_id, limit=None)}
    b = {r["source"]: r["score"] for r in station.store.history(batch_id=fresh.batch_id, limit=None)}
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)  # batch size free
    one = station.registry.get("brick").inspect(read_image(files[0]))[0].score  # the single-image path
    assert a[str(files[0].resolve())] == pytest.approx(one, rel=1e-5)


@pytest.fixture(scope="module")
def musc_product(station, brick):
    """The MuSc product, registered by whichever test needs it first (tests run in random order)."""
    if not station.registry.exists("brick-musc"):
        rng = np.random.default_rng(4)
        station.registry.register("brick-musc", [random_crop(brick, rng, 96) for _ in range(2)], detector="musc",
                                  backbone="tiny-cnn", image_size=64, n_synthetic=2)
    return "brick-musc"


def test_musc_batch_scores_the_folder_in_subsets_and_resumes_identically(station, musc_product, brick, tmp_path):
    folder = tmp_path / "musc"
    files = _good_folder(folder, brick, 10, seed=5)
    (folder / "bad.jpg").write_bytes(b"junk")
    calls = []

    def stop_after_first_subset(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    kw = dict(progress=False, musc_subset=4, batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        run_batch(folder, "brick-musc", station.registry, station.store, on_progress=stop_after_first_subset, **kw)
    s = run_batch(folder, "brick-musc", station.registry, station.store, **kw)
    assert s.n_files == 11 and s.n_errors == 1 and s.n_scored == 10 and 0 < s.n_skipped < 11
    clean = run_batch(folder, "brick-musc", station.registry, station.store, resume=False, heatmaps="none", **kw)
    a = {r["source"]: r["score"] for r in station.store.history(batch_id=s.batch_id, limit=None) if r["score"]}
    b = {r["source"]: r["score"] for r in station.store.history(batch_id=clean.batch_id, limit=None) if r["score"]}
    assert len(a) == len(files) and a.keys() == b.keys()
    assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)  # same subsets after a resume


def test_onnx_runtime_refused_clearly_for_musc(station, musc_product, capsys):
    from inspector.cli.main import main

    folder = station.data_dir.parent / "empty-folder"
    folder.mkdir(exist_ok=True)
    code = main(["batch", str(folder), "--product", "brick-musc", "--data-dir", str(station.data_dir),
                 "--runtime", "onnx"])
    assert code == 1
    assert "cannot run as an ONNX graph" in capsys.readouterr().err
    assert main(["batch", str(folder / "missing"), "--product", "brick", "--data-dir", str(station.data_dir)]) == 1
    assert main(["inspect", "x.png", "--product", "nope", "--data-dir", str(station.data_dir)]) == 1
    assert "unknown product 'nope'" in capsys.readouterr().err


def test_iter_files_is_sorted_skips_hidden_and_excluded(tmp_path):
    for rel in ("b.png", "a.txt", "sub/c.png", ".hid/x.png", ".dot.png", "out/r.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in iter_files(tmp_path, exclude=(tmp_path / "out",))]
    assert got == ["a.txt", "b.png", "sub/c.png"]
