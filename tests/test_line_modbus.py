"""Modbus TCP reject gate, polled with the real pymodbus client."""

from __future__ import annotations

import time

import pytest
from conftest import deadline, timeout_mark
from pymodbus.client import ModbusTcpClient

from inspector.line.pipeline import LineVerdict
from inspector.line.sinks.modbus import VERDICT_CODES, ModbusSettings, RejectGateServer

pytestmark = timeout_mark(120)
PULSE_MS = 400.0


@pytest.fixture(scope="module")
def gate():
    srv = RejectGateServer(ModbusSettings(enabled=True, port=0, pulse_ms=PULSE_MS, heartbeat_s=0.2)).start(deadline(30))
    client = ModbusTcpClient("127.0.0.1", port=srv.port, timeout=deadline(10))
    assert client.connect()
    yield srv, client
    client.close()
    srv.stop()


def _coil(client, i: int) -> bool:
    return client.read_coils(0, count=4, device_id=1).bits[i]


def _pulse(client, coil: int, timeout: float = 10.0) -> tuple[float, float]:
    """Poll until the coil has risen and fallen; (seconds it was seen high, seconds to the fall)."""
    t0 = time.monotonic()
    first = last = None
    while time.monotonic() - t0 < deadline(timeout):
        now, high = time.monotonic(), _coil(client, coil)
        if high:
            first = now if first is None else first
            last = now
        elif first is not None:
            return last - first, now - t0
    raise AssertionError("coil did not fall")


def test_ng_gives_one_reject_pulse_of_the_configured_width(gate):
    srv, client = gate
    t = time.monotonic()
    while _coil(client, 0) and time.monotonic() - t < deadline(10):  # another test's pulse still running
        time.sleep(0.02)
    assert _coil(client, 0) is False
    srv.on_verdict(LineVerdict(5, "p", "NG", 1.234, 0x12345678, 1, 9, 0.05))
    t = time.monotonic()
    assert _coil(client, 0) is True
    high, _ = _pulse(client, 0)
    fell_after = time.monotonic() - t
    # high at least until shortly before the configured width (polling resolution), never much longer
    assert PULSE_MS / 1e3 * 0.8 <= high and fell_after <= PULSE_MS / 1e3 + 5.0
    regs = client.read_input_registers(0, count=18, device_id=1).registers
    assert regs[1] == VERDICT_CODES["NG"] and (regs[2] << 16 | regs[3]) == 5
    assert (regs[4] << 16 | regs[5]) == 0x12345678 and regs[6] == 1234
    assert client.read_holding_registers(0, count=18, device_id=1).registers[1:7] == regs[1:7]


def test_ok_does_not_reject_error_does(gate):
    srv, client = gate
    srv.on_verdict(LineVerdict(6, "p", "OK", 0.1, 1, 1, 10, 0.05))
    assert _coil(client, 3) is True and _coil(client, 0) is False  # PASS pulse, no REJECT
    srv.on_verdict(LineVerdict(7, "p", "ERROR", None, 2, 1, None, 0.05, "dropped: queue full", dropped=True))
    assert _coil(client, 0) is True  # a part that was not inspected is not passed


def test_heartbeat_moves_and_plc_cannot_write(gate):
    srv, client = gate
    h0 = client.read_holding_registers(0, count=1, device_id=1).registers[0]
    seen = {_coil(client, 2)}
    t = time.monotonic()
    while time.monotonic() - t < deadline(3) and len(seen) < 2:
        seen.add(_coil(client, 2))
        time.sleep(0.03)
    assert seen == {True, False}  # the heartbeat coil toggles
    assert client.read_holding_registers(0, count=1, device_id=1).registers[0] > h0
    assert _coil(client, 1) is False  # no line attached: not ready
    assert client.write_coil(1, True, device_id=1).isError()
    assert client.write_register(1, 1, device_id=1).isError()
    assert _coil(client, 1) is False
