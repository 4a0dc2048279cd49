"""Optional Modbus TCP server for a reject gate or a small PLC (pymodbus): the station is the
server, the PLC polls it. Read-only for the PLC (writes are answered ILLEGAL_FUNCTION).

Register map (0-based addresses; coils and discrete inputs carry the same bits)::

    coil 0   REJECT     high for ``pulse_ms`` after a part whose verdict is in ``reject_on``
                        (default NG and ERROR: a part that was not inspected is not passed)
    coil 1   READY      model loaded and camera delivering
    coil 2   HEARTBEAT  toggles every ``heartbeat_s``; a PLC watchdog sees a hung station
    coil 3   PASS       high for ``pulse_ms`` after an OK part

    register 0       heartbeat counter (uint16, wraps)
    register 1       last verdict: 0 none, 1 OK, 2 UNCERTAIN, 3 NG, 4 ERROR
    register 2-3     part id (uint32, high word first)
    register 4-5     frame id (uint32, high word first; low 32 bits of the camera's id)
    register 6       score x 1000, clipped to 0..65535
    register 7       ready (0/1)
    register 8-17    counters OK, UNCERTAIN, NG, ERROR, dropped (uint32 each, high word first)

Holding and input registers carry the same values. Values are computed when the PLC reads them,
so a pulse is exactly as wide as configured, whatever the polling rate.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from inspector.line.loopthread import LoopThreadServer
from inspector.line.pipeline import COUNTERS, LineVerdict

log = logging.getLogger(__name__)
VERDICT_CODES = {"OK": 1, "UNCERTAIN": 2, "NG": 3, "ERROR": 4}
N_COILS, N_REGS = 4, 18
_READS = {1, 2, 3, 4}


@dataclass
class ModbusSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 5020  # 502 needs root; PLCs can be pointed at any port
    pulse_ms: float = 200.0
    reject_on: list[str] = field(default_factory=lambda: ["NG", "ERROR"])
    heartbeat_s: float = 1.0
    device_id: int = 1

    def validate(self) -> None:
        if self.pulse_ms <= 0:
            raise ValueError("modbus pulse_ms must be > 0")
        bad = [v for v in self.reject_on if v not in VERDICT_CODES]
        if bad:
            raise ValueError(f"modbus reject_on: unknown verdict(s) {bad}; use {', '.join(VERDICT_CODES)}")


def _u32(v: int) -> list[int]:
    v = int(v) & 0xFFFFFFFF
    return [v >> 16, v & 0xFFFF]


class RejectGateServer(LoopThreadServer):
    """The Modbus TCP server on its own thread and event loop. ``pipeline`` supplies READY and
    the counters (None: a gate driven only by :meth:`on_verdict`)."""

    label = "Modbus"

    def __init__(self, settings: ModbusSettings, pipeline=None):
        super().__init__()
        settings.validate()
        self.settings = settings
        self.pipeline = pipeline
        self.port: int | None = None
        self._lock = threading.Lock()
        self._last: LineVerdict | None = None
        self._reject_until = 0.0
        self._pass_until = 0.0
        self._t0 = time.monotonic()
        self._server: ModbusTcpServer | None = None

    # ---- values ------------------------------------------------------------------------------
    def on_verdict(self, v: LineVerdict) -> None:
        now = time.monotonic()
        with self._lock:
            self._last = v
            if v.verdict in self.settings.reject_on:
                self._reject_until = now + self.settings.pulse_ms / 1e3
            elif v.verdict == "OK":
                self._pass_until = now + self.settings.pulse_ms / 1e3

    def _beats(self) -> int:
        return int((time.monotonic() - self._t0) / self.settings.heartbeat_s)

    def coils(self) -> list[int]:
        now = time.monotonic()
        ready = bool(self.pipeline.ready) if self.pipeline is not None else False
        with self._lock:
            return [int(now < self._reject_until), int(ready), self._beats() & 1, int(now < self._pass_until)]

    def registers(self) -> list[int]:
        with self._lock:
            v = self._last
        ready = bool(self.pipeline.ready) if self.pipeline is not None else False
        counts = dict(self.pipeline.counts) if self.pipeline is not None else dict.fromkeys(COUNTERS, 0)
        regs = [self._beats() & 0xFFFF, VERDICT_CODES.get(v.verdict, 0) if v else 0,
                *_u32(v.part if v else 0), *_u32(v.frame_id or 0 if v else 0),
                min(65535, max(0, round((v.score or 0.0) * 1000))) if v and v.score is not None else 0,
                int(ready)]
        for name in COUNTERS:
            regs += _u32(counts.get(name, 0))
        return regs

    async def _action(self, function_code, start_address, address, count, current_registers, set_values):
        if function_code not in _READS:
            return ExcCodes.ILLEGAL_FUNCTION  # read-only for the PLC
        if function_code in (1, 2):  # bits live packed in 16-bit words, coil 0 = bit 0 of word 0
            values = [sum(int(b) << i for i, b in enumerate(self.coils()))]
        else:
            values = self.registers()
        for i in range(len(current_registers)):
            a = start_address + i
            if 0 <= a < len(values):
                current_registers[i] = values[a]
        return None

    # ---- lifecycle ---------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._server is not None and not self._loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
            try:
                fut.result(timeout)
            except Exception:  # noqa: BLE001
                pass
        self._join(timeout)

    async def _main(self) -> None:
        s = self.settings
        bits = [SimData(0, count=N_COILS, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=N_REGS, values=0, datatype=DataType.REGISTERS)]
        device = SimDevice(s.device_id, simdata=(bits, [SimData(0, count=N_COILS, values=False, datatype=DataType.BITS)],
                                                 regs, [SimData(0, count=N_REGS, values=0,
                                                                datatype=DataType.REGISTERS)]),
                           action=self._action)
        self._server = ModbusTcpServer(device, address=(s.host, s.port))
        await self._server.serve_forever(background=True)
        sockets = getattr(self._server.transport, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.port
        log.info("modbus: reject gate on %s:%s (device id %s)", s.host, self.port, s.device_id)
        self._started.set()
        await self._server.serving


__all__ = ["ModbusSettings", "RejectGateServer", "VERDICT_CODES"]
