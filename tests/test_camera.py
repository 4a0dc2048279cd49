"""Camera sources: folder replay as a stream; a bad frame or a dropped source gives a visible
error state, and the camera recovers on its own."""

from __future__ import annotations

import shutil
import time

import cv2
import numpy as np
import pytest
from conftest import deadline, wait_for

from inspector.cameras.camera import Camera, open_camera
from inspector.cameras.registry import make_source
from inspector.cameras.sources import FolderSource, OpenCVSource
from inspector.io import write_image


def _frames(folder, n=4, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((size, size, 3), 40 * i, np.uint8)
        img[0, 0] = (i, 0, 0)  # a tag to recognise the frame
        write_image(folder / f"f{i:03d}.png", img)
    return folder


def _tag(frame):
    return int(frame.image[0, 0, 0])


def test_make_source_parses_specs(tmp_path):
    assert isinstance(make_source("0"), OpenCVSource)
    assert isinstance(make_source(2), OpenCVSource)
    assert isinstance(make_source("rtsp://user:pw@10.0.0.5/stream"), OpenCVSource)
    assert "pw" not in make_source("rtsp://user:pw@10.0.0.5/stream").label
    assert isinstance(make_source("http://127.0.0.1:8080/video.mjpg"), OpenCVSource)
    assert isinstance(make_source(tmp_path / "clip.mp4"), OpenCVSource)
    assert isinstance(make_source(tmp_path), FolderSource)
    with pytest.raises(ValueError):
        make_source("  ")


def test_folder_replay_loops_in_order(tmp_path):
    cam = open_camera(_frames(tmp_path / "cam", 3))
    assert cam.state == "idle"
    tags = [_tag(cam.next_frame()) for _ in range(7)]
    assert tags == [0, 1, 2, 0, 1, 2, 0]
    assert cam.state == "live" and cam.frames == 7 and cam.errors == 0


def test_bad_frame_shows_error_then_recovers(tmp_path):
    folder = _frames(tmp_path / "cam", 3)
    (folder / "f001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")  # corrupt frame
    cam = open_camera(folder)
    first = cam.next_frame()
    assert first.ok and _tag(first) == 0
    bad = cam.next_frame()
    assert not bad.ok and bad.image is None
    assert bad.state == "error" and cam.state == "error"
    assert "f001.png" in bad.error and cam.last_error == bad.error
    good = cam.next_frame()  # the source was not lost: the next frame comes at once
    assert good.ok and _tag(good) == 2 and cam.state == "live" and cam.last_error is None
    assert cam.errors == 1 and cam.reconnects == 0


def test_dropped_folder_shows_error_and_reconnects(tmp_path):
    folder = _frames(tmp_path / "cam", 2)
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    backoff = deadline(0.5)  # so long that the call right after the loss comes within it, however busy
    cam = open_camera(folder, backoff=backoff, max_backoff=2 * backoff)
    assert cam.next_frame().ok
    shutil.rmtree(folder)  # the source drops
    lost = cam.next_frame()
    assert not lost.ok and cam.state == "reconnecting" and "folder" in lost.error
    waiting = cam.next_frame()  # within the back-off: no busy retry, still an error state
    assert not waiting.ok and waiting.state == "reconnecting" and "reconnecting in" in waiting.error
    time.sleep(1.2 * backoff)  # past the back-off: the time passing is the condition (load only lengthens it)
    still = cam.next_frame()  # retried, still gone
    assert not still.ok and cam.state == "reconnecting"
    shutil.copytree(backup, folder)  # the source comes back (retried after the doubled back-off)
    frame = wait_for(lambda: (f := cam.next_frame()).ok and f, 10, lambda: f"a reconnection: {cam.status()}")
    assert frame.ok and cam.state == "live" and cam.reconnects == 1
    assert cam.status()["last_error"] is None


def test_hot_folder_stream_end_then_new_frames(tmp_path):
    folder = _frames(tmp_path / "hot", 2)
    cam = Camera(FolderSource(folder, loop=False), backoff=0.01, max_backoff=0.02)
    assert [_tag(cam.next_frame()) for _ in range(2)] == [0, 1]
    end = cam.next_frame()
    assert not end.ok and "stream ended" in end.error and cam.state == "reconnecting"
    img = np.zeros((32, 32, 3), np.uint8)
    img[0, 0] = (9, 0, 0)
    write_image(folder / "f100.png", img)  # the line camera writes a new frame
    time.sleep(0.03)  # past the 0.01 s back-off: the time passing is the condition (load only lengthens it)
    frame = cam.next_frame()
    assert frame.ok and _tag(frame) == 9 and frame.name == "f100.png" and cam.state == "live"
    time.sleep(0.03)  # a pause, not a wait for anything: the frame must not come again after it
    assert not cam.next_frame().ok  # delivered once only


def test_video_stream_end_reconnects(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for i in range(3):
        writer.write(np.full((24, 32, 3), 60 * i, np.uint8))
    writer.release()
    cam = open_camera(path, backoff=0.01)
    got = [cam.next_frame() for _ in range(3)]
    assert all(f.ok for f in got) and got[0].image.shape == (24, 32, 3)
    end = cam.next_frame()
    assert not end.ok and cam.state == "reconnecting" and "ended" in end.error
    time.sleep(0.02)  # past the 0.01 s back-off: the time passing is the condition (load only lengthens it)
    again = cam.next_frame()  # reopened from the start
    assert again.ok and cam.reconnects == 1


def test_unavailable_device_is_a_setup_error_not_a_crash_nor_a_retry_loop():
    cam = open_camera("rtsp://127.0.0.1:9/none", backoff=0.01)
    cam.source.timeout_ms = 500
    f = cam.next_frame()
    assert not f.ok and cam.state == "failed" and "setup error" in f.error and "cannot open" in f.error
    time.sleep(0.02)  # past the 0.01 s back-off (time passing is the condition): still not retried
    f2 = cam.next_frame()
    assert not f2.ok and f2.state == "failed" and cam.errors == 1
    cam.close()
    assert cam.state == "closed"


def test_missing_folder_is_a_setup_error_until_started_again(tmp_path):
    folder = tmp_path / "nonexistent"
    cam = open_camera(folder, backoff=0.01)
    f = cam.next_frame()
    assert not f.ok and cam.state == "failed" and "folder not found" in f.error
    time.sleep(0.02)  # past the 0.01 s back-off (time passing is the condition)
    assert cam.next_frame().state == "failed" and cam.errors == 1  # no endless retry
    _frames(folder, 1)
    assert cam.next_frame().state == "failed"  # only a new start (close) tries again
    cam.close()
    assert cam.next_frame().ok and cam.state == "live"
