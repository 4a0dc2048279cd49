"""The ``[line]`` tables of the station config (see ``deploy/station.example.toml``)::

    [line]
    enabled = false          # `inspector serve` also runs the line when true; `inspector line run` always does
    product = "brick"        # active product at start (switchable over OPC UA)
    source = "genicam://"    # camera: genicam://DEVICE_ID, or any Live-tab source (folder, rtsp://, index)
    queue_size = 4           # frames waiting for inspection; beyond that parts are dropped (and reported)
    save_heatmaps = false    # heatmap PNG per part (costs time on every part; not in the bench/LINE.md timings)
    trigger_timeout_s = 5.0  # a software trigger whose frame does not come in time: part dropped
    keep_ok_fraction = 0.1   # share of OK parts whose image is kept as evidence (NG/UNCERTAIN: all)

    [line.camera]            # GenICam settings (inspector.cameras.genicam.GenICamSettings)
    [line.opcua]             # OPC UA server (inspector.line.sinks.opcua.OpcUaSettings)
    [line.modbus]            # Modbus TCP reject gate (inspector.line.sinks.modbus.ModbusSettings)
    [line.metrics]           # /metrics + /health (inspector.line.sinks.metrics.MetricsSettings)

Every key is optional; the defaults are the safe ones (servers bound to 127.0.0.1, OPC UA
anonymous read-only, Modbus off). Unknown keys are errors, so a typo never silently falls back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from inspector.cameras.genicam import GenICamSettings
from inspector.line.sinks.metrics import MetricsSettings
from inspector.line.sinks.modbus import ModbusSettings
from inspector.line.sinks.opcua import OpcUaSettings


def _build(cls, values: dict[str, Any] | None, where: str):
    values = dict(values or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"[{where}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if cls is GenICamSettings:
        return GenICamSettings.from_dict(values)
    out = {}
    for k, v in values.items():
        default = getattr(cls(), k)
        if isinstance(default, bool):
            v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int) and not isinstance(default, bool):
            v = int(v)
        elif isinstance(default, float):
            v = float(v)
        elif isinstance(default, dict):
            v = {str(a): str(b) for a, b in dict(v).items()}
        elif isinstance(default, list):
            v = [str(x) for x in (v.split(",") if isinstance(v, str) else v)]
        out[k] = v
    obj = cls(**out)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


@dataclass
class LineConfig:
    enabled: bool = False
    product: str | None = None
    source: str | None = None
    queue_size: int = 4
    save_heatmaps: bool = False
    trigger_timeout_s: float = 5.0
    #: share of OK parts whose image is kept as evidence (NG and UNCERTAIN always are; ERROR never)
    keep_ok_fraction: float = 0.1
    camera: GenICamSettings = field(default_factory=lambda: GenICamSettings(trigger="software"))
    opcua: OpcUaSettings = field(default_factory=OpcUaSettings)
    modbus: ModbusSettings = field(default_factory=ModbusSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> LineConfig:
        values = dict(values or {})
        sections = {"camera": GenICamSettings, "opcua": OpcUaSettings, "modbus": ModbusSettings,
                    "metrics": MetricsSettings}
        scalars = {k: v for k, v in values.items() if k not in sections}
        known = {f.name for f in fields(cls)} - set(sections)
        unknown = sorted(set(scalars) - known)
        if unknown:
            raise ValueError(f"[line]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known | set(sections)))}")
        cam = {"trigger": "software", **dict(values.get("camera") or {})}
        cfg = cls(camera=_build(GenICamSettings, cam, "line.camera"),
                  **{k: _build(c, values.get(k), f"line.{k}") for k, c in sections.items() if k != "camera"})
        for k, v in scalars.items():
            if k in ("enabled", "save_heatmaps"):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
            elif k == "queue_size":
                v = int(v)
            elif k in ("trigger_timeout_s", "keep_ok_fraction"):
                v = float(v)
            setattr(cfg, k, v)
        if cfg.queue_size < 1:
            raise ValueError("[line]: queue_size must be >= 1")
        if not 0.0 <= cfg.keep_ok_fraction <= 1.0:
            raise ValueError(f"[line]: keep_ok_fraction must lie in [0, 1], got {cfg.keep_ok_fraction}")
        return cfg


__all__ = ["LineConfig"]
