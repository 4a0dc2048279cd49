"""A running line station: camera -> pipeline -> (OPC UA, Modbus, metrics), built from a
:class:`~inspector.line.config.LineConfig`. Used by ``inspector line run`` and by ``inspector serve``
when ``[line] enabled = true``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from inspector.cameras.camera import Camera
from inspector.cameras.registry import make_source, scheme_of
from inspector.line.config import LineConfig
from inspector.line.pipeline import LinePipeline
from inspector.line.sinks.metrics import LineMetrics, MetricsServer

log = logging.getLogger(__name__)


def make_line_camera(cfg: LineConfig) -> Camera:
    """The camera of the line. A GenICam camera gets the ``[line.camera]`` settings (the spec's
    query parameters override them), with ``self_trigger`` off: the pipeline triggers it once per part."""
    spec = cfg.source or "genicam://"
    source = make_source(spec, base={"genicam": cfg.camera})
    if scheme_of(spec) == "genicam":
        source.settings = replace(source.settings, self_trigger=False)
    return Camera(source, backoff=0.5, max_backoff=5.0)


class LineStation:
    """Owns the line's threads and servers; ``start()`` then ``stop()`` (or use as a context manager)."""

    def __init__(self, station, cfg: LineConfig, *, data_dir: str | Path | None = None, camera: Camera | None = None):
        if not cfg.product:
            raise ValueError("[line]: set product (the product inspected on this line)")
        self.station, self.cfg = station, cfg
        self.data_dir = Path(data_dir or station.data_dir)
        self.camera = camera or make_line_camera(cfg)
        self.pipeline = LinePipeline(station, cfg.product, self.camera, queue_size=cfg.queue_size,
                                     save_heatmaps=cfg.save_heatmaps, trigger_timeout_s=cfg.trigger_timeout_s,
                                     keep_ok_fraction=cfg.keep_ok_fraction)
        self.metrics = LineMetrics(self.pipeline)
        self.pipeline.listeners.append(self.metrics.on_verdict)
        self.pipeline.drop_listeners.append(self.metrics.on_dropped_frame)
        self.metrics_server = MetricsServer(self.metrics, cfg.metrics) if cfg.metrics.enabled else None
        self.opcua = None
        self.modbus = None

    def start(self) -> LineStation:
        try:
            if self.metrics_server is not None:
                self.metrics_server.start()
            self.pipeline.start()  # loads the model first: the health endpoint says not-ready until then
            if self.cfg.opcua.enabled:
                from inspector.line.sinks.opcua import StationOpcUaServer

                self.opcua = StationOpcUaServer(self.cfg.opcua, self.pipeline, pki_dir=self.data_dir).start()
                self.pipeline.listeners.append(self.opcua.on_verdict)
            if self.cfg.modbus.enabled:
                from inspector.line.sinks.modbus import RejectGateServer

                self.modbus = RejectGateServer(self.cfg.modbus, self.pipeline).start()
                self.pipeline.listeners.append(self.modbus.on_verdict)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.pipeline.stop()
        for srv in (self.opcua, self.modbus, self.metrics_server):
            if srv is not None:
                try:
                    srv.stop()
                except Exception:  # noqa: BLE001
                    log.exception("line: stopping %r failed", srv)

    def __enter__(self) -> LineStation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> list[str]:
        out = [f"line: product {self.pipeline.product!r}, camera {self.camera.label}, queue {self.cfg.queue_size}"]
        if self.metrics_server is not None:
            out.append(f"metrics: {self.metrics_server.url}/metrics  health: {self.metrics_server.url}/health")
        if self.opcua is not None:
            out.append(f"OPC UA: {self.opcua.url} ({'Basic256Sha256 Sign&Encrypt + login' if self.cfg.opcua.secure else 'anonymous read-only'})")
        if self.modbus is not None:
            out.append(f"Modbus TCP: {self.cfg.modbus.host}:{self.modbus.port} (reject pulse {self.cfg.modbus.pulse_ms:g} ms)")
        return out + self.warnings()

    def warnings(self) -> list[str]:
        c, out = self.cfg, []
        if c.opcua.enabled and not c.opcua.secure and not _loopback(c.opcua.host):
            out.append(f"warning: OPC UA on {c.opcua.host} without [line.opcua.users]: anyone on that network "
                       "reads verdicts (anonymous, unencrypted; read-only)")
        if c.modbus.enabled and not _loopback(c.modbus.host):
            out.append(f"warning: Modbus TCP on {c.modbus.host} has no authentication (read-only); keep it on the "
                       "line network")
        return out


def _loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["LineStation", "make_line_camera"]
