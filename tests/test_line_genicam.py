"""GenICam source against the real fake GigE Vision camera of Aravis over loopback."""

from __future__ import annotations

import sys
import threading
import time

import cv2
import numpy as np
import pytest
from _line_fakecam import fake_camera
from conftest import deadline, timeout_mark

from inspector.cameras.base import FrameError, SourceLost
from inspector.cameras.camera import Camera
from inspector.cameras.registry import make_source

CAMERA_TIMEOUT = timeout_mark(120)  # a hang in the camera stack fails the test, not the suite


def _wait(pred, timeout: float, step: float = 0.05):
    """``pred()``'s first truthy value within ``deadline(timeout)`` s, else its last (falsy) one."""
    until = time.monotonic() + deadline(timeout)
    while time.monotonic() < until:
        out = pred()
        if out:
            return out
        time.sleep(step)
    return pred()


# ---- pixel formats (no camera needed) -----------------------------------------------------------
def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Brute-force Bayer sampling as GenICam defines it: ``pattern`` names the 2x2 block at (0, 0)."""
    ch = {"R": 0, "G": 1, "B": 2}
    out = np.empty(rgb.shape[:2], np.uint8)
    for dy in range(2):
        for dx in range(2):
            out[dy::2, dx::2] = rgb[dy::2, dx::2, ch[pattern[2 * dy + dx]]]
    return out


@pytest.mark.parametrize("fmt,pattern", [("BayerRG8", "RGGB"), ("BayerBG8", "BGGR"),
                                         ("BayerGR8", "GRBG"), ("BayerGB8", "GBRG")])
def test_bayer_demosaic_recovers_colours(fmt, pattern):
    from inspector.cameras.genicam import to_rgb

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16] = (200, 30, 10)    # red
    rgb[:, 16:32] = (20, 180, 40)  # green
    rgb[:, 32:] = (10, 40, 220)    # blue
    out = to_rgb(_mosaic(rgb, pattern).tobytes(), 48, 32, fmt)
    inner = (slice(4, -4), np.r_[4:12, 20:28, 36:44])
    assert np.abs(out[inner].astype(int) - rgb[inner].astype(int)).max() <= 2


def test_mono_and_rgb_formats():
    from inspector.cameras.genicam import PFNC, to_rgb

    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = to_rgb(g.tobytes(), 4, 3, 0x01080001)
    assert out.shape == (3, 4, 3) and (out == g[..., None]).all()
    m12 = (g.astype(np.uint16) << 4) | 0x0F  # 12-bit data, low nibble noise
    assert (to_rgb(m12.astype("<u2").tobytes(), 4, 3, "Mono12")[..., 1] == g).all()
    rgb = np.random.default_rng(0).integers(0, 255, (3, 4, 3), dtype=np.uint8)
    assert (to_rgb(rgb.tobytes(), 4, 3, "RGB8") == rgb).all()
    assert (to_rgb(np.ascontiguousarray(rgb[..., ::-1]).tobytes(), 4, 3, "BGR8") == rgb).all()
    with pytest.raises(FrameError, match="short"):
        to_rgb(b"\0" * 5, 4, 3, "Mono8")
    with pytest.raises(FrameError, match="unsupported pixel format"):
        to_rgb(b"\0" * 100, 4, 3, 0x0210001F)
    assert PFNC[0x02180014] == "RGB8"


def test_missing_genicam_stack_gives_install_hint(monkeypatch):
    from inspector.cameras.genicam import GenICamUnavailable

    monkeypatch.setitem(sys.modules, "gi", None)  # as on a machine without PyGObject
    with pytest.raises(GenICamUnavailable, match="install_line.sh"):
        make_source("genicam://Aravis-Fake-GV01")


def test_settings_validation():
    from inspector.cameras.genicam import GenICamSettings, GenICamSource

    with pytest.raises(ValueError, match="trigger must be"):
        GenICamSettings(trigger="sometimes")
    with pytest.raises(ValueError, match="unknown camera setting"):
        GenICamSettings.from_dict({"exposure": 5})
    s = GenICamSettings.from_dict({"roi": "0,0,64,32", "buffers": "3", "trigger": "software"})
    assert s.roi == (0, 0, 64, 32) and s.buffers == 3
    with pytest.raises(ValueError, match="roi"):
        GenICamSettings(roi=(0, 0, 0, 10))
    pytest.importorskip("gi")
    src = GenICamSource.from_spec("genicam://Aravis-Fake-X1?exposure_us=500&trigger=software")
    assert src.device_id == "Aravis-Fake-X1" and src.settings.exposure_us == 500.0
    assert src.settings.trigger == "software" and src.settings.pixel_format == "Mono8"


# ---- the real fake camera ------------------------------------------------------------------------
@CAMERA_TIMEOUT
def test_free_run_stream_with_roi_and_metadata():
    with fake_camera() as fake:
        from inspector.cameras.genicam import discover

        assert fake.device_id in [d["id"] for d in discover()]
        frames = _frames(f"genicam://{fake.device_id}?roi=8,4,128,96&exposure_us=2000&gain_db=1", 4)
    assert all(f.ok for f in frames), [f.error for f in frames]
    assert {f.image.shape for f in frames} == {(96, 128, 3)}
    ids = [f.meta["frame_id"] for f in frames]
    ts = [f.meta["device_timestamp_ns"] for f in frames]
    assert all(b > a for a, b in zip(ids, ids[1:])) and all(b > a for a, b in zip(ts, ts[1:]))
    assert frames[0].name == f"frame{ids[0]}@{ts[0]}"
    assert frames[0].meta["pixel_format"] == "Mono8"
    assert frames[0].image.std() > 0  # the fake camera draws a moving pattern, not a blank buffer


@CAMERA_TIMEOUT
def test_software_trigger_one_frame_per_trigger():
    from inspector.cameras.genicam import GenICamSettings, GenICamSource

    with fake_camera() as fake:
        src = GenICamSource(fake.device_id, GenICamSettings(trigger="software", self_trigger=False,
                                                            roi=(0, 0, 64, 64), timeout_s=0.5))
        src.open()
        try:
            assert src._cam.get_device().get_string_feature_value("TriggerMode") == "On"
            ids = []
            for _ in range(3):  # a camera ignores triggers while busy: one trigger, one frame
                src.software_trigger()
                ids.append(src.read()[1])
            got: list = []

            def wait_one():
                try:
                    got.append(src.read())
                except SourceLost as exc:
                    got.append(exc)

            t = threading.Thread(target=wait_one, daemon=True)
            t.start()
            time.sleep(1.2)  # a quiet window (the thing under test): > 2 x timeout_s, no trigger, no frame
            assert got == []
            src.close()  # unblocks the waiting reader
            t.join(deadline(10))
        finally:
            src.close()
    nums = [int(n.split("@")[0][5:]) for n in ids]
    assert nums == list(range(nums[0], nums[0] + 3))
    assert len(got) == 1 and isinstance(got[0], SourceLost)


@CAMERA_TIMEOUT
def test_live_tab_spec_self_triggers():
    with fake_camera() as fake:
        a, b = _frames(f"genicam://{fake.device_id}?trigger=software&roi=0,0,32,32", 2)
    assert a.ok and b.ok and b.meta["frame_id"] == a.meta["frame_id"] + 1


@CAMERA_TIMEOUT
def test_reconnects_after_camera_killed_and_restarted():
    from inspector.cameras.genicam import GenICamSettings, GenICamSource

    with fake_camera() as fake:
        # free-run: a frame must come within timeout_s, which a busy machine stretches
        src = GenICamSource(fake.device_id, GenICamSettings(roi=(0, 0, 64, 64), timeout_s=deadline(0.5)))
        cam = Camera(src, backoff=0.2, max_backoff=0.5)
        try:
            assert cam.next_frame().ok
            fake.kill()
            lost = _wait(lambda: (f := cam.next_frame()).error and f, 20)
            assert lost and lost.state == "reconnecting" and cam.state == "reconnecting"
            assert not cam.next_frame().ok  # still gone
            fake.start(deadline(30))
            back = _wait(lambda: (f := cam.next_frame()).ok and f, 60, step=0.1)
            assert back, cam.status()
            assert cam.reconnects >= 1 and cam.state == "live"
            assert back.image.shape == (64, 64, 3)
        finally:
            cam.close()


@CAMERA_TIMEOUT
def test_wrong_device_id_is_a_clear_error():
    with fake_camera() as fake:
        (f,) = _frames(f"genicam://{fake.device_id}-NOPE", backoff=30)
    assert not f.ok and f.state == "reconnecting"
    assert "not found" in f.error and fake.device_id + "-NOPE" in f.error


@CAMERA_TIMEOUT
def test_unsupported_pixel_format_names_the_offered_ones():
    with fake_camera() as fake:
        (f,) = _frames(f"genicam://{fake.device_id}?pixel_format=YUV422_8", backoff=30)
    assert not f.ok and "YUV422_8" in f.error and "Mono8" in f.error


@CAMERA_TIMEOUT
def test_rgb8_from_camera():
    with fake_camera() as fake:
        (f,) = _frames(f"genicam://{fake.device_id}?pixel_format=RGB8&roi=0,0,48,40")
    assert f.ok and f.image.shape == (40, 48, 3) and f.meta["pixel_format"] == "RGB8"
    assert cv2.cvtColor(f.image, cv2.COLOR_RGB2GRAY).std() > 0


@CAMERA_TIMEOUT
def test_hardware_trigger_arms_the_input_line_and_waits():
    from inspector.cameras.genicam import GenICamSettings, GenICamSource

    with fake_camera() as fake:
        src = GenICamSource(fake.device_id, GenICamSettings(trigger="hardware", trigger_source="Line0",
                                                            roi=(0, 0, 32, 32), timeout_s=0.3))
        src.open()
        try:
            dev = src._cam.get_device()
            assert dev.get_string_feature_value("TriggerMode") == "On"
            assert dev.get_string_feature_value("TriggerSource") == "Line0"
            got: list = []
            t = threading.Thread(target=lambda: got.append(_safe_read(src)), daemon=True)
            t.start()
            time.sleep(1.0)  # a quiet window (the thing under test): nothing on the input line, no frame, no error
            assert got == []
        finally:
            src.close()
        t.join(deadline(10))
    assert len(got) == 1 and isinstance(got[0], SourceLost)  # closing unblocks the waiting reader


def _frames(url: str, n: int = 1, **camera_kw) -> list:
    """``n`` frames from a Camera on ``url`` (opened and always closed here); a free-running
    camera's frame-wait ``timeout_s`` is scaled by ``deadline`` (a busy machine delivers late)."""
    from inspector.cameras.genicam import settings_with

    src = make_source(url)
    src.settings = settings_with(src.settings, timeout_s=deadline(src.settings.timeout_s))
    cam = Camera(src, **camera_kw)
    try:
        return [cam.next_frame() for _ in range(n)]
    finally:
        cam.close()


def _safe_read(src):
    try:
        return src.read()
    except Exception as exc:  # noqa: BLE001
        return exc
