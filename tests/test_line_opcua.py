"""The station's OPC UA server, read and subscribed to with the real asyncua client."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from conftest import deadline, timeout_mark

from inspector.line.pipeline import LineVerdict
from inspector.line.sinks.opcua import NAMESPACE, OpcUaSettings, StationOpcUaServer, make_self_signed
from inspector.security.passwords import hash_password

pytestmark = timeout_mark(120)


@pytest.fixture(scope="module")
def anon_server():
    srv = StationOpcUaServer(OpcUaSettings(enabled=True, port=0, heartbeat_s=0.2)).start(deadline(60))
    yield srv
    srv.stop()


async def _station(client: Client):
    idx = await client.get_namespace_index(NAMESPACE)
    st = await client.nodes.objects.get_child(f"{idx}:Station")
    return idx, st


def test_anonymous_is_read_only_and_sees_verdicts(anon_server):
    async def main():
        async with Client(anon_server.url, timeout=deadline(30)) as client:
            idx, st = await _station(client)
            beat = await st.get_child(f"{idx}:Heartbeat")
            b0 = await beat.read_value()
            until = time.monotonic() + deadline(10)  # 50 heartbeats: it moves long before, however busy
            while await beat.read_value() <= b0 and time.monotonic() < until:
                await asyncio.sleep(0.05)
            assert await beat.read_value() > b0  # the watchdog value moves

            part = await st.get_child(f"{idx}:PartId")
            changes: asyncio.Queue = asyncio.Queue()

            class Handler:
                def datachange_notification(self, node, val, data):
                    changes.put_nowait(val)

            sub = await client.create_subscription(50, Handler())
            await sub.subscribe_data_change(part)
            assert await asyncio.wait_for(changes.get(), deadline(30)) == 0  # initial value
            anon_server.on_verdict(LineVerdict(7, "brick", "NG", 3.5, 123456, 99, 42, 0.051))
            assert await asyncio.wait_for(changes.get(), deadline(30)) == 7
            assert await (await st.get_child(f"{idx}:LastVerdict")).read_value() == "NG"
            assert await (await st.get_child(f"{idx}:FrameId")).read_value() == 123456
            assert await (await st.get_child(f"{idx}:Score")).read_value() == 3.5
            assert math.isclose(await (await st.get_child(f"{idx}:LatencyMs")).read_value(), 51.0)
            counters = await st.get_child(f"{idx}:Counters")
            assert await (await counters.get_child(f"{idx}:Dropped")).read_value() == 0

            with pytest.raises(ua.UaStatusCodeError) as err:
                await (await st.get_child(f"{idx}:LastVerdict")).write_value("OK")
            assert err.value.code in (ua.StatusCodes.BadUserAccessDenied, ua.StatusCodes.BadNotWritable)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await st.call_method(f"{idx}:SetProduct", "other")
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await st.call_method(f"{idx}:Trigger")
            await sub.delete()

    asyncio.run(main())
    assert anon_server.url.startswith("opc.tcp://127.0.0.1:")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return {"client": make_self_signed(d / "client.pem", d / "client-key.pem", common_name="plc", uri="urn:test:plc")}


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    """Users configured, no certificate given: the server generates its own (as in production)."""
    data = tmp_path_factory.mktemp("station-data")
    settings = OpcUaSettings(enabled=True, port=0, heartbeat_s=0.2, users={"plc": hash_password("line-1 secret")})
    srv = StationOpcUaServer(settings, pki_dir=data).start(deadline(60))
    srv.data_dir = data
    yield srv
    srv.stop()


async def _secure_client(url: str, pki, user: str | None, password: str | None) -> Client:
    client = Client(url, timeout=deadline(30))
    client.application_uri = "urn:test:plc"
    cert, key = pki["client"]
    await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), mode=ua.MessageSecurityMode.SignAndEncrypt)
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    return client


def test_secure_server_requires_login_and_encryption(secure_server, pki):
    async def main():
        endpoints = await Client(secure_server.url, timeout=deadline(30)).connect_and_get_server_endpoints()
        assert {e.SecurityPolicyUri for e in endpoints} == {SecurityPolicyBasic256Sha256.URI}
        assert {e.SecurityMode for e in endpoints} == {ua.MessageSecurityMode.SignAndEncrypt}

        client = await _secure_client(secure_server.url, pki, "plc", "line-1 secret")
        async with client:
            idx, st = await _station(client)
            assert await (await st.get_child(f"{idx}:Heartbeat")).read_value() >= 1
            # logged in, but no line attached to this server: the method is reached and says so
            with pytest.raises(ua.uaerrors.BadNotSupported):
                await st.call_method(f"{idx}:SetProduct", "other")

        for user, pw in (("plc", "wrong"), ("nobody", "line-1 secret"), (None, None)):
            bad = await _secure_client(secure_server.url, pki, user, pw)
            with pytest.raises(ua.UaError):
                await bad.connect()
            await bad.disconnect()

        plain = Client(secure_server.url, timeout=deadline(30))  # no encryption: no such endpoint
        with pytest.raises(ua.UaError):
            await plain.connect()
        await plain.disconnect()

    asyncio.run(main())


def test_generated_server_certificate_is_private(secure_server):
    from cryptography import x509

    cert = secure_server.data_dir / "opcua" / "server-cert.pem"
    key = secure_server.data_dir / "opcua" / "server-key.pem"
    assert key.stat().st_mode & 0o077 == 0  # the private key is readable by the station user only
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    uris = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [NAMESPACE]  # OPC UA clients match the application URI against the certificate
