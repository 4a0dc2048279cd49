"""A whole line: fake GigE Vision camera -> station -> OPC UA (secure, logged in), Modbus reject
gate, /metrics and /health, configured through the [line] tables, read with the real clients."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
from _line_fakecam import fake_camera
from _line_station import make_station
from conftest import deadline, timeout_mark

from inspector.line.config import LineConfig
from inspector.security.passwords import hash_password
from inspector.station.config import ConfigError, StationConfig

pytestmark = [timeout_mark(300), pytest.mark.usefixtures("one_torch_thread")]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=deadline(30)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait(pred, timeout=60.0, step=0.05):
    """True once ``pred()`` is, within ``deadline(timeout)`` s."""
    until = time.monotonic() + deadline(timeout)
    while time.monotonic() < until:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def test_line_config_tables(tmp_path):
    toml = tmp_path / "station.toml"
    toml.write_text('[line]\nproduct = "pa"\nsource = "genicam://X"\nqueue_size = 3\n'
                    '[line.camera]\nexposure_us = 1500\nroi = [0, 0, 64, 64]\n'
                    '[line.opcua]\nenabled = true\n[line.opcua.users]\nplc = "pw"\n'
                    '[line.modbus]\nenabled = true\npulse_ms = 120\n')
    cfg = StationConfig.load(toml, env={})
    lc = LineConfig.from_dict(cfg.line)
    assert lc.queue_size == 3 and lc.camera.exposure_us == 1500 and lc.camera.roi == (0, 0, 64, 64)
    assert lc.camera.trigger == "software"  # a line is triggered by default
    assert lc.opcua.secure and lc.opcua.host == "127.0.0.1" and lc.modbus.pulse_ms == 120.0
    assert LineConfig().opcua.enabled is False and LineConfig().modbus.enabled is False
    toml.write_text('[line.modbus]\npulse = 5\n')
    with pytest.raises(ConfigError, match="unknown key"):
        StationConfig.load(toml, env={})
    toml.write_text('[line.camera]\ntrigger = "always"\n')
    with pytest.raises(ConfigError, match="trigger must be"):
        StationConfig.load(toml, env={})


async def _opcua(url: str, pki, user: str, password: str, product_after: str):
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    from inspector.line.sinks.opcua import NAMESPACE

    client = Client(url, timeout=deadline(30))
    client.application_uri = "urn:test:plc"
    await client.set_security(SecurityPolicyBasic256Sha256, str(pki[0]), str(pki[1]),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    client.set_user(user)
    client.set_password(password)
    async with client:
        idx = await client.get_namespace_index(NAMESPACE)
        st = await client.nodes.objects.get_child(f"{idx}:Station")
        node = {n: await st.get_child(f"{idx}:{n}") for n in ("PartId", "LastVerdict", "FrameId", "Ready", "Product")}
        parts: asyncio.Queue = asyncio.Queue()

        class Handler:
            def datachange_notification(self, n, val, data):
                parts.put_nowait(val)

        sub = await client.create_subscription(50, Handler())
        await sub.subscribe_data_change(node["PartId"])
        assert await asyncio.wait_for(parts.get(), deadline(60)) == 0
        until = time.monotonic() + deadline(30)
        while not await node["Ready"].read_value() and time.monotonic() < until:  # refreshed every heartbeat
            await asyncio.sleep(0.05)
        assert await node["Ready"].read_value() is True
        accepted = await st.call_method(f"{idx}:Trigger")  # the PLC triggers a part
        assert accepted is True
        assert await asyncio.wait_for(parts.get(), deadline(60)) == 1
        out = {"verdict": await node["LastVerdict"].read_value(), "frame_id": await node["FrameId"].read_value()}
        assert await st.call_method(f"{idx}:SetProduct", product_after) == product_after
        assert await node["Product"].read_value() == product_after
        with pytest.raises(ua.uaerrors.BadInvalidArgument):
            await st.call_method(f"{idx}:SetProduct", "no-such-product")
        await sub.delete()
        return out


def test_whole_line_camera_to_plc(tmp_path):
    from pymodbus.client import ModbusTcpClient

    from inspector.line.runner import LineStation
    from inspector.line.sinks.modbus import VERDICT_CODES
    from inspector.line.sinks.opcua import make_self_signed

    station = make_station(tmp_path)
    pki = make_self_signed(tmp_path / "plc.pem", tmp_path / "plc-key.pem", common_name="plc", uri="urn:test:plc")
    with fake_camera() as fake:
        lc = LineConfig.from_dict({
            "product": "pa", "source": f"genicam://{fake.device_id}",
            "camera": {"roi": [0, 0, 64, 64], "timeout_s": 0.5},
            "trigger_timeout_s": deadline(5.0),  # a frame late under load is no dropped part
            "opcua": {"enabled": True, "port": 0, "heartbeat_s": 0.2, "users": {"plc": hash_password("pw-1")}},
            "modbus": {"enabled": True, "port": 0, "pulse_ms": 300},
            "metrics": {"port": 0},
        })
        with LineStation(station, lc) as line:
            base = line.metrics_server.url
            assert _wait(lambda: _get(base + "/health")[0] == 200), _get(base + "/health")
            res = asyncio.run(_opcua(line.opcua.url, pki, "plc", "pw-1", "pb"))
            last = line.pipeline.last
            assert res == {"verdict": last.verdict, "frame_id": last.frame_id} and last.product == "pa"

            mb = ModbusTcpClient("127.0.0.1", port=line.modbus.port, timeout=deadline(10))
            assert mb.connect()
            regs = mb.read_holding_registers(0, count=18, device_id=1).registers
            assert regs[1] == VERDICT_CODES[last.verdict] and (regs[2] << 16 | regs[3]) == 1
            assert (regs[4] << 16 | regs[5]) == last.frame_id & 0xFFFFFFFF and regs[7] == 1
            assert mb.read_coils(0, count=4, device_id=1).bits[1] is True  # READY

            status, body = _get(base + "/metrics")
            text = body.decode()
            assert status == 200
            assert f'inspector_inspections_total{{product="pa",verdict="{last.verdict}"}} 1.0' in text
            assert "inspector_trigger_to_verdict_seconds_count 1.0" in text
            assert "inspector_camera_connected 1.0" in text and "inspector_queue_depth 0.0" in text

            fake.kill()  # the camera goes away: not ready, everywhere
            assert _wait(lambda: _get(base + "/health")[0] == 503, 60)
            health = json.loads(_get(base + "/health")[1])
            assert not health["ready"] and any("camera" in r for r in health["reasons"])
            assert _wait(lambda: mb.read_coils(0, count=4, device_id=1).bits[1] is False, 30)
            assert "inspector_camera_connected 0.0" in _get(base + "/metrics")[1].decode()
            fake.start(deadline(30))  # ... and comes back (waits for its port)
            assert _wait(lambda: _get(base + "/health")[0] == 200, 90), _get(base + "/health")
            mb.close()


def test_serve_starts_a_free_run_line_from_config(tmp_path):
    """`inspector serve` with [line] enabled: here a folder replayed as a free-running stream (no
    GenICam needed); every frame it can take is inspected, the others are counted as dropped."""
    from PIL import Image
    from skimage import data

    from app.serve import _start_line

    station = make_station(tmp_path, names=("pa",))
    frames = tmp_path / "frames"
    frames.mkdir()
    g = data.brick()
    for i in range(3):
        Image.fromarray(g[i * 64:i * 64 + 96, :96]).save(frames / f"{i}.png")
    cfg = StationConfig.load(None, env={})
    cfg.allowed_batch_roots = [tmp_path]
    assert _start_line(station, cfg) is None  # no [line]: nothing starts
    cfg.line = {"enabled": True, "product": "pa", "source": str(frames), "queue_size": 1, "metrics": {"port": 0}}
    line = _start_line(station, cfg)
    try:
        assert not line.pipeline.triggered
        assert _wait(lambda: line.pipeline.counts["OK"] + line.pipeline.counts["UNCERTAIN"]
                     + line.pipeline.counts["NG"] >= 3, 120)
        status, body = _get(line.metrics_server.url + "/health")
        assert status == 200, body
    finally:
        line.stop()
    rows = station.history(limit=50)
    assert rows and all(r["source"].startswith("line:frames/") and r["error"] is None for r in rows)
    assert {r["source"].rsplit("/", 1)[1] for r in rows} <= {"0.png", "1.png", "2.png"}
