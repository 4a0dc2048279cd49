"""GenICam line cameras (GigE Vision, USB3 Vision) through Aravis, as a station frame source.

``genicam://DEVICE_ID`` opens a camera by anything Aravis accepts as a device id: the full id
(``Vendor-Model-Serial``, e.g. ``Aravis-Fake-GV01``), the serial number, or the IP address of a
GigE Vision camera; ``genicam://`` (empty id) takes the first camera found. Settings come from the
station config (:class:`GenICamSettings`) or, in the Live tab, from query parameters:
``genicam://Aravis-Fake-GV01?trigger=software&exposure_us=2000&roi=0,0,256,256``.

Why Aravis: it is the open-source GenICam stack (GigE Vision + USB3 Vision transport, GenApi
feature access) packaged by Debian, reached from Python through GObject introspection; it needs no
vendor SDK. It is an optional extra (``scripts/install_line.sh``): without it, opening a
``genicam://`` source raises :class:`GenICamUnavailable` with the install command.

Every frame carries the camera's frame id and device timestamp (:attr:`GenICamSource.last_meta`;
the frame name is ``frame<ID>@<TIMESTAMP_NS>``), so inspection records point at the exact buffer.
A camera that disappears (unplugged, powered off, process killed) makes :meth:`read` raise
:class:`~inspector.cameras.base.SourceLost`; :class:`~inspector.cameras.camera.Camera` then reopens it with
back-off until it is back. Opened through :mod:`inspector.cameras.registry` (scheme ``genicam``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import cv2
import numpy as np

from inspector.cameras.base import CameraError, FrameError, FrameSource, SourceLost

SCHEME = "genicam://"
TRIGGER_MODES = ("free-run", "software", "hardware")

# Pixel Format Naming Convention codes (GenICam PFNC; the values Aravis reports).
PFNC = {
    0x01080001: "Mono8",
    0x01100003: "Mono10",
    0x01100005: "Mono12",
    0x01100025: "Mono14",
    0x01100007: "Mono16",
    0x02180014: "RGB8",
    0x02180015: "BGR8",
    0x01080008: "BayerGR8",
    0x01080009: "BayerRG8",
    0x0108000A: "BayerGB8",
    0x0108000B: "BayerBG8",
}
_BITS = {"Mono8": 8, "Mono10": 10, "Mono12": 12, "Mono14": 14, "Mono16": 16}
# OpenCV names a Bayer pattern by the 2x2 block starting at pixel (1, 1); GenICam by the block at
# (0, 0). So GenICam "RG" (R at the origin) is OpenCV's "BG" (B at (1, 1)), and so on.
_BAYER = {"BayerRG8": cv2.COLOR_BayerBG2RGB, "BayerBG8": cv2.COLOR_BayerRG2RGB,
          "BayerGR8": cv2.COLOR_BayerGB2RGB, "BayerGB8": cv2.COLOR_BayerGR2RGB}


class GenICamUnavailable(CameraError):
    """The GenICam stack (Aravis via PyGObject) is not installed."""


INSTALL_HINT = ("GenICam cameras need Aravis through PyGObject: run scripts/install_line.sh "
                "(Debian packages aravis-tools gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev "
                "pkg-config, then pip install '.[line]' i.e. pygobject<3.51)")


def load_aravis():
    """Import ``gi.repository.Aravis`` or raise :class:`GenICamUnavailable` saying how to install it."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as exc:
        raise GenICamUnavailable(f"{INSTALL_HINT}; import failed: {exc}") from exc
    return Aravis


def available() -> bool:
    """Whether the GenICam stack can be imported here."""
    try:
        load_aravis()
    except GenICamUnavailable:
        return False
    return True


@dataclass
class GenICamSettings:
    """Camera settings applied at every (re)open. ``None`` leaves the camera's own value."""

    #: camera-side pixel format (what travels on the wire); frames always come out as RGB8
    pixel_format: str | None = "Mono8"
    exposure_us: float | None = None
    gain_db: float | None = None
    #: region of interest ``(x, y, width, height)`` on the sensor
    roi: tuple[int, int, int, int] | None = None
    #: frame rate in free-run mode (None: the camera's)
    frame_rate: float | None = None
    #: "free-run" (continuous), "software" (TriggerSoftware) or "hardware" (a line input)
    trigger: str = "free-run"
    #: input line of a hardware trigger ("Line0", "Line1", ... as the camera names them)
    trigger_source: str = "Line0"
    #: "RisingEdge" / "FallingEdge" for hardware triggers (None: the camera's)
    trigger_activation: str | None = None
    #: buffers queued on the stream: frames the camera can deliver while the station is busy
    buffers: int = 8
    #: a frame expected (free-run, or after our own trigger) but absent this long -> check the camera
    timeout_s: float = 2.0
    #: software mode: read() sends the trigger itself (Live tab); the line pipeline triggers explicitly
    self_trigger: bool = True
    #: GigE Vision packet size (None: negotiated by Aravis)
    packet_size: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.trigger not in TRIGGER_MODES:
            raise ValueError(f"trigger must be one of {', '.join(TRIGGER_MODES)}, got {self.trigger!r}")
        if int(self.buffers) < 1:
            raise ValueError(f"buffers must be >= 1, got {self.buffers}")
        if float(self.timeout_s) <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.roi is not None:
            roi = tuple(int(v) for v in self.roi)
            if len(roi) != 4 or roi[2] <= 0 or roi[3] <= 0 or roi[0] < 0 or roi[1] < 0:
                raise ValueError(f"roi must be (x, y, width, height) with positive size, got {self.roi!r}")
            self.roi = roi

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenICamSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown camera setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        out: dict[str, Any] = {}
        for k, v in values.items():
            if k in ("exposure_us", "gain_db", "frame_rate", "timeout_s"):
                v = None if v in (None, "") else float(v)
            elif k in ("buffers", "packet_size"):
                v = None if v in (None, "") and k == "packet_size" else int(v)
            elif k == "roi" and isinstance(v, str):
                v = tuple(int(p) for p in v.split(",")) if v else None
            elif k == "self_trigger" and isinstance(v, str):
                v = v.lower() in ("1", "true", "yes", "on")
            out[k] = v
        return cls(**out)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``genicam://ID?k=v`` -> ``(ID, {k: v})``; ID may be empty (first camera)."""
    if not spec.lower().startswith(SCHEME):
        raise ValueError(f"not a GenICam source: {spec!r} (expected {SCHEME}DEVICE_ID)")
    parts = urlsplit(spec)
    device = unquote(parts.netloc + parts.path).strip("/")
    return device, dict(parse_qsl(parts.query, keep_blank_values=True))


def discover(aravis=None) -> list[dict[str, str]]:
    """The GenICam cameras visible now (GigE Vision discovery broadcast + USB3 Vision scan)."""
    ar = aravis or load_aravis()
    ar.update_device_list()
    out = []
    for i in range(ar.get_n_devices()):
        out.append({"id": ar.get_device_id(i), "address": ar.get_device_address(i) or "",
                    "vendor": ar.get_device_vendor(i) or "", "model": ar.get_device_model(i) or "",
                    "serial": ar.get_device_serial_nbr(i) or "", "protocol": ar.get_device_protocol(i) or ""})
    return out


def to_rgb(data: bytes | np.ndarray, width: int, height: int, pixel_format: int | str) -> np.ndarray:
    """One camera buffer -> RGB uint8 ``(height, width, 3)``. Mono10..16 are scaled to 8 bits."""
    name = PFNC.get(pixel_format, pixel_format) if isinstance(pixel_format, int) else pixel_format
    buf = np.frombuffer(data, dtype=np.uint8)
    if name in ("Mono8", *_BAYER):
        need = width * height
        if buf.size < need:
            raise FrameError(f"short {name} buffer: {buf.size} bytes for {width}x{height}")
        img = buf[:need].reshape(height, width)
        code = _BAYER.get(name, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(img, code)
    if name in ("RGB8", "BGR8"):
        need = width * height * 3
        if buf.size < need:
            raise FrameError(f"short {name} buffer: {buf.size} bytes for {width}x{height}")
        img = buf[:need].reshape(height, width, 3)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if name == "BGR8" else img.copy()
    if name in _BITS:
        need = width * height * 2
        if buf.size < need:
            raise FrameError(f"short {name} buffer: {buf.size} bytes for {width}x{height}")
        img16 = buf[:need].view("<u2").reshape(height, width)
        img = (img16 >> (_BITS[name] - 8)).clip(0, 255).astype(np.uint8)
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    code = f"0x{pixel_format:08x}" if isinstance(pixel_format, int) else str(pixel_format)
    raise FrameError(f"unsupported pixel format {code}; set pixel_format to one of {', '.join(sorted(set(PFNC.values())))}")


@dataclass
class _Meta:
    frame_id: int
    device_timestamp_ns: int
    system_timestamp_ns: int
    width: int
    height: int
    pixel_format: str


class GenICamSource(FrameSource):
    """One GenICam camera (see module docstring). Thread-safety: ``read`` runs on one thread;
    :meth:`software_trigger` and :meth:`close` may be called from others."""

    def __init__(self, device_id: str = "", settings: GenICamSettings | None = None, *, aravis=None):
        self.aravis = aravis or load_aravis()  # fail at construction, with the install hint
        self.device_id = device_id
        self.settings = settings or GenICamSettings()
        self.label = f"genicam {device_id or '(first camera)'}"
        self.short = device_id or "genicam"
        self.last_meta: dict[str, Any] | None = None
        self._cam = None
        self._stream = None
        self._closing = threading.Event()
        self._ctl = threading.Lock()  # control channel: settings, triggers, liveness probes

    @classmethod
    def from_spec(cls, spec: str, base: GenICamSettings | None = None) -> GenICamSource:
        device, query = parse_spec(spec)
        settings = base or GenICamSettings()
        if query:
            merged = {f.name: getattr(settings, f.name) for f in fields(settings)}
            merged.update(query)
            try:
                settings = GenICamSettings.from_dict(merged)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{spec}: {exc}") from exc
        return cls(device, settings)

    # ---- open / close ----------------------------------------------------------------------
    def open(self) -> None:
        self.close()
        self._closing.clear()
        ar, s = self.aravis, self.settings
        target = self._resolve()
        try:
            cam = ar.Camera.new(target)
        except Exception as exc:  # GLib.GError: cannot connect
            raise SourceLost(f"{self.label}: camera not reachable at {target} ({_gerror(exc)})") from exc
        try:
            with self._ctl:
                self._configure(cam, s)
            stream = cam.create_stream(None, None)
            if stream is None:
                raise SourceLost(f"{self.label}: cannot create a stream")
            payload = cam.get_payload()
            for _ in range(int(s.buffers)):
                stream.push_buffer(ar.Buffer.new_allocate(payload))
            cam.start_acquisition()
        except SourceLost:
            raise
        except Exception as exc:
            raise SourceLost(f"{self.label}: cannot configure camera ({_gerror(exc)})") from exc
        self._cam, self._stream = cam, stream
        self.short = self.device_id or cam.get_device_id() or "genicam"

    def _resolve(self) -> str:
        """Discover, match the configured id, and return what to open. A GigE Vision camera is
        opened by the address it answered discovery from: opening by name alone may pick another
        host interface for the stream (seen over loopback: control works, no frame arrives)."""
        try:
            devices = discover(self.aravis)
        except Exception as exc:  # noqa: BLE001
            raise SourceLost(f"{self.label}: camera discovery failed ({_gerror(exc)})") from exc
        want = self.device_id
        for d in devices:
            names = {d["id"], d["serial"], d["address"], f"{d['vendor']}-{d['serial']}"}
            if not want or want in names:
                if d["protocol"].lower() in ("gigevision", "gev") and d["address"]:
                    return d["address"]
                return d["id"]
        seen = ", ".join(d["id"] for d in devices) or "none"
        raise SourceLost(f"{self.label}: camera not found (cameras visible: {seen})")

    def _configure(self, cam, s: GenICamSettings) -> None:
        ar = self.aravis
        try:
            cam.stop_acquisition()
        except Exception:  # noqa: BLE001 - a fresh camera may refuse; nothing to stop
            pass
        if s.packet_size and cam.is_gv_device():
            cam.gv_set_packet_size(int(s.packet_size))
        if s.pixel_format:
            available = list(cam.dup_available_pixel_formats_as_strings() or [])
            if available and s.pixel_format not in available:
                raise SourceLost(f"{self.label}: pixel format {s.pixel_format!r} not offered "
                                 f"(camera offers {', '.join(available)})")
            cam.set_pixel_format_from_string(s.pixel_format)
        if s.roi is not None:
            cam.set_region(*s.roi)
        if s.exposure_us is not None:
            cam.set_exposure_time_auto(ar.Auto.OFF) if cam.is_exposure_auto_available() else None
            cam.set_exposure_time(float(s.exposure_us))
        if s.gain_db is not None:
            cam.set_gain_auto(ar.Auto.OFF) if cam.is_gain_auto_available() else None
            cam.set_gain(float(s.gain_db))
        cam.set_acquisition_mode(ar.AcquisitionMode.CONTINUOUS)
        if s.trigger == "free-run":
            cam.clear_triggers()
            if s.frame_rate:
                cam.set_frame_rate(float(s.frame_rate))
        else:
            source = "Software" if s.trigger == "software" else s.trigger_source
            offered = list(cam.dup_available_trigger_sources() or [])
            if offered and source not in offered:
                raise SourceLost(f"{self.label}: trigger source {source!r} not offered "
                                 f"(camera offers {', '.join(offered)})")
            cam.set_trigger(source)
            if s.trigger_activation:
                cam.get_device().set_string_feature_value("TriggerActivation", s.trigger_activation)

    def close(self) -> None:
        self._closing.set()
        cam, self._cam, self._stream = self._cam, None, None
        if cam is not None:
            try:
                with self._ctl:
                    cam.stop_acquisition()
            except Exception:  # noqa: BLE001 - a lost camera cannot be stopped; drop it
                pass

    @property
    def is_open(self) -> bool:
        return self._cam is not None and not self._closing.is_set()

    # ---- triggers and frames ---------------------------------------------------------------
    def software_trigger(self) -> None:
        """Send TriggerSoftware (software trigger mode). Raises SourceLost if the camera is gone."""
        cam = self._cam
        if cam is None:
            raise SourceLost(f"{self.label}: not open")
        try:
            with self._ctl:
                cam.software_trigger()
        except Exception as exc:
            raise SourceLost(f"{self.label}: trigger failed ({_gerror(exc)})") from exc

    def alive(self) -> bool:
        """Probe the control channel (one register read); False when the camera does not answer."""
        cam = self._cam
        if cam is None:
            return False
        try:
            with self._ctl:
                cam.get_device().get_integer_feature_value("Width")
        except Exception:  # noqa: BLE001
            return False
        return True

    def read(self) -> tuple[np.ndarray, str | None]:
        """The next frame as RGB8. Free-run and self-triggered software mode: a frame must come
        within ``timeout_s`` (else FrameError if the camera still answers, SourceLost if not).
        Line-triggered modes wait for as long as it takes, probing the camera every ``timeout_s``."""
        s = self.settings
        if self._cam is None or self._stream is None:
            raise SourceLost(f"{self.label}: not open")
        expect = s.trigger == "free-run" or (s.trigger == "software" and s.self_trigger)
        if s.trigger == "software" and s.self_trigger:
            self.software_trigger()
        step_us = int(min(s.timeout_s, 0.25) * 1e6)
        deadline = time.monotonic() + s.timeout_s
        while True:
            stream = self._stream
            if self._closing.is_set() or stream is None:
                raise SourceLost(f"{self.label}: closed")
            buf = stream.timeout_pop_buffer(step_us)
            if buf is not None:
                return self._take(stream, buf)
            if time.monotonic() < deadline:
                continue
            if not self.alive():
                raise SourceLost(f"{self.label}: camera stopped answering (disconnected?)")
            if expect:
                raise FrameError(f"{self.label}: no frame within {s.timeout_s:g} s")
            deadline = time.monotonic() + s.timeout_s

    def _take(self, stream, buf) -> tuple[np.ndarray, str | None]:
        ar = self.aravis
        try:
            status = buf.get_status()
            if status != ar.BufferStatus.SUCCESS:
                raise FrameError(f"{self.label}: incomplete frame ({_enum_name(status)})")
            width, height, fmt = buf.get_image_width(), buf.get_image_height(), buf.get_image_pixel_format()
            meta = _Meta(int(buf.get_frame_id()), int(buf.get_timestamp()), int(buf.get_system_timestamp()),
                         int(width), int(height), PFNC.get(fmt, f"0x{fmt:08x}"))
            image = to_rgb(buf.get_data(), width, height, fmt)  # a copy: the buffer goes back below
        finally:
            stream.push_buffer(buf)
        self.last_meta = dict(meta.__dict__)
        return image, f"frame{meta.frame_id}@{meta.device_timestamp_ns}"


def _gerror(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    return msg.strip()


def _enum_name(value) -> str:
    return getattr(value, "value_nick", None) or str(value)


def settings_with(settings: GenICamSettings, **changes) -> GenICamSettings:
    """A copy of ``settings`` with ``changes`` applied (validated)."""
    out = replace(settings, **changes)
    out.validate()
    return out


__all__ = ["GenICamSettings", "GenICamSource", "GenICamUnavailable", "INSTALL_HINT", "PFNC", "SCHEME",
           "TRIGGER_MODES", "available", "discover", "load_aravis", "parse_spec", "settings_with", "to_rgb"]
