"""Prometheus metrics and a health endpoint for a line station, on a small HTTP server of its own
(so it runs with or without the web UI, and a scraper never waits behind a model call).

    GET /metrics   Prometheus text format (prometheus-client)
    GET /health    200 {"ready": true, ...} when the model is loaded and the camera delivers;
                   503 with the reasons while either is down (for a load balancer or systemd)
    GET /live      200 while the process serves HTTP (liveness)

Metrics: ``inspector_inspections_total{product,verdict}``, ``inspector_frames_dropped_total{product}``,
``inspector_trigger_to_verdict_seconds`` (histogram), ``inspector_camera_connected``,
``inspector_model_ready``, ``inspector_ready``, ``inspector_queue_depth``, ``inspector_queue_size``.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from inspector.line.pipeline import LineVerdict

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


@dataclass
class MetricsSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108


class LineMetrics:
    """The station's metrics in their own registry (several stations or tests in one process
    never share counters). ``pipeline`` is read at scrape time for the gauges."""

    def __init__(self, pipeline=None, registry: CollectorRegistry | None = None):
        self.pipeline = pipeline
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.inspections = Counter("inspector_inspections", "Inspected parts by verdict", ["product", "verdict"],
                                   registry=r)
        self.dropped = Counter("inspector_frames_dropped", "Parts not inspected (queue full, no frame, camera down)",
                               ["product"], registry=r)
        self.latency = Histogram("inspector_trigger_to_verdict_seconds", "Trigger to published verdict",
                                 buckets=LATENCY_BUCKETS, registry=r)
        p = pipeline
        Gauge("inspector_camera_connected", "1 while the camera is open and delivering", registry=r).set_function(
            lambda: float(bool(p is not None and p.camera_connected)))
        Gauge("inspector_model_ready", "1 once the active product's model is loaded", registry=r).set_function(
            lambda: float(bool(p is not None and p.model_ready)))
        Gauge("inspector_ready", "1 when the line may send parts", registry=r).set_function(
            lambda: float(bool(p is not None and p.ready)))
        Gauge("inspector_queue_depth", "Frames waiting for inspection", registry=r).set_function(
            lambda: float(p.queue_depth if p is not None else 0))
        Gauge("inspector_queue_size", "Capacity of the inspection queue", registry=r).set_function(
            lambda: float(p.queue_size if p is not None else 0))

    def on_dropped_frame(self, product: str) -> None:
        self.dropped.labels(product=product).inc()

    def on_verdict(self, v: LineVerdict) -> None:
        if v.dropped:
            self.dropped.labels(product=v.product).inc()
            return
        self.inspections.labels(product=v.product, verdict=v.verdict).inc()
        self.latency.observe(v.latency_s)

    def health(self) -> tuple[bool, dict]:
        p = self.pipeline
        if p is None:
            return False, {"ready": False, "reasons": ["no line pipeline"]}
        reasons = []
        if not p.model_ready:
            reasons.append(f"model of product {p.product!r} not loaded")
        if not p.camera_connected:
            cam = p.camera.status()
            reasons.append(f"camera {cam['source']} {cam['state']}" + (f": {cam['last_error']}" if cam["last_error"] else ""))
        if not reasons and not p.ready:
            reasons.append("pipeline not running")
        st = p.status()
        return not reasons, {"ready": not reasons, "reasons": reasons, "product": st["product"],
                             "camera": st["camera"], "queue_depth": st["queue_depth"], "counts": st["counts"]}


class MetricsServer:
    """``/metrics``, ``/health`` and ``/live`` on a threaded HTTP server (port 0: any free port)."""

    def __init__(self, metrics: LineMetrics, settings: MetricsSettings):
        self.metrics, self.settings = metrics, settings
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return self._httpd.server_address[1] if self._httpd else None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def start(self) -> MetricsServer:
        metrics = self.metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    ok, body = metrics.health()
                    self._send(200 if ok else 503, json.dumps(body, default=str).encode(), "application/json")
                elif path == "/live":
                    self._send(200, b'{"live": true}', "application/json")
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # scrapes every few seconds: keep them out of the log
                log.debug("metrics http: " + fmt, *args)

        self._httpd = ThreadingHTTPServer((self.settings.host, self.settings.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics: %s/metrics, %s/health", self.url, self.url)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


__all__ = ["LATENCY_BUCKETS", "LineMetrics", "MetricsServer", "MetricsSettings"]
