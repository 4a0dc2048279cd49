"""OPC UA server of one station (asyncua): verdicts, counters, readiness and a heartbeat for the
PLC or SCADA, and methods to switch the product and trigger a part.

Address space (namespace ``urn:inspector:station``), under ``Objects/Station``::

    LastVerdict  String   OK / UNCERTAIN / NG / ERROR of the last part
    Score        Double   its anomaly score (NaN when there is none)
    FrameId      UInt64   the camera's frame id of that part
    PartId       UInt64   running part number; written LAST, so a client subscribed to PartId
                          reads a consistent LastVerdict/Score/FrameId when it changes
    LatencyMs    Double   trigger -> verdict
    Product      String   active product
    Ready        Boolean  model loaded and camera delivering
    Heartbeat    UInt64   +1 every ``heartbeat_s``: a PLC watchdog sees a hung station
    Counters/    OK, UNCERTAIN, NG, ERROR, Dropped (UInt64)
    SetProduct(name: String) -> String   switch the active product (logged-in users only)
    Trigger() -> Boolean                 software trigger of one part (logged-in users only)

Security. Default: anonymous, read-only (variables are not writable, methods are refused with
BadUserAccessDenied), no encryption, bound to 127.0.0.1. When ``users`` are configured the
server offers only Basic256Sha256 Sign&Encrypt, requires a user name and password (anonymous
sessions are refused unless ``allow_anonymous_read``, and then they may only read), and logged-in
users may call the methods. The server certificate comes from the config or is generated once,
self-signed, next to the station data (:func:`make_self_signed`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole
from asyncua.server.user_managers import UserManager

from inspector.line.loopthread import LoopThreadServer
from inspector.line.pipeline import LineVerdict
from inspector.security.passwords import check_password

log = logging.getLogger(__name__)
NAMESPACE = "urn:inspector:station"
_READ_TYPES = {ua.NodeId(t) for t in (
    ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary, ua.ObjectIds.CloseSessionRequest_Encoding_DefaultBinary,
    ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary, ua.ObjectIds.ReadRequest_Encoding_DefaultBinary,
    ua.ObjectIds.BrowseRequest_Encoding_DefaultBinary, ua.ObjectIds.BrowseNextRequest_Encoding_DefaultBinary,
    ua.ObjectIds.GetEndpointsRequest_Encoding_DefaultBinary, ua.ObjectIds.FindServersRequest_Encoding_DefaultBinary,
    ua.ObjectIds.TranslateBrowsePathsToNodeIdsRequest_Encoding_DefaultBinary,
    ua.ObjectIds.CreateSubscriptionRequest_Encoding_DefaultBinary,
    ua.ObjectIds.ModifySubscriptionRequest_Encoding_DefaultBinary,
    ua.ObjectIds.DeleteSubscriptionsRequest_Encoding_DefaultBinary,
    ua.ObjectIds.CreateMonitoredItemsRequest_Encoding_DefaultBinary,
    ua.ObjectIds.ModifyMonitoredItemsRequest_Encoding_DefaultBinary,
    ua.ObjectIds.DeleteMonitoredItemsRequest_Encoding_DefaultBinary,
    ua.ObjectIds.PublishRequest_Encoding_DefaultBinary, ua.ObjectIds.RepublishRequest_Encoding_DefaultBinary,
    ua.ObjectIds.CloseSecureChannelRequest_Encoding_DefaultBinary,
    ua.ObjectIds.SetMonitoringModeRequest_Encoding_DefaultBinary,
    ua.ObjectIds.SetPublishingModeRequest_Encoding_DefaultBinary,
    ua.ObjectIds.RegisterNodesRequest_Encoding_DefaultBinary,
    ua.ObjectIds.UnregisterNodesRequest_Encoding_DefaultBinary)}


@dataclass
class OpcUaSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 4840
    #: user name -> stored password, as in the station's ``[users]`` (scrypt hash from `inspector
    #: hash-password`, legacy "sha256:<hex>" or plain); non-empty switches on Sign&Encrypt + login
    users: dict[str, str] = field(default_factory=dict)
    #: server certificate and key (PEM or DER); generated self-signed when users are set and these are not
    certificate: str | None = None
    private_key: str | None = None
    allow_anonymous_read: bool = False
    heartbeat_s: float = 1.0
    name: str = "Inspection station"

    @property
    def secure(self) -> bool:
        return bool(self.users)


class _Users(UserManager):
    def __init__(self, users: dict[str, str], anonymous: bool):
        self.users, self.anonymous = dict(users), anonymous

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username is None:
            return User(role=UserRole.Anonymous) if self.anonymous else None
        stored = self.users.get(username)
        if stored is not None and password is not None and check_password(stored, password):
            return User(role=UserRole.User, name=username)
        log.warning("opcua: login refused for user %r", username)
        return None


class _Rules(PermissionRuleset):
    """Logged-in users: the usual user requests (call included). Anonymous: read, browse, subscribe."""

    def __init__(self):
        self._user = {ua.NodeId(t) for t in USER_TYPES}

    def check_validity(self, user, action_type_id, body):
        if user.role in (UserRole.User, UserRole.Admin):
            return action_type_id in self._user
        return action_type_id in _READ_TYPES


def make_self_signed(cert_path: str | Path, key_path: str | Path, *, common_name: str = "inspector-station",
                     uri: str = "urn:inspector:station", hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                     days: int = 3650) -> tuple[Path, Path]:
    """Write a self-signed RSA-2048 certificate (PEM) and key (PEM) usable for Basic256Sha256.

    The application URI goes into subjectAltName, as OPC UA requires."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _format(path: Path) -> str:
    """PEM or DER by content (asyncua guesses by file extension, e.g. DER for ``.key``)."""
    with open(path, "rb") as f:
        return "PEM" if f.read(11) == b"-----BEGIN " else "DER"


class StationOpcUaServer(LoopThreadServer):
    """The server on its own thread and event loop. ``pipeline`` (a LinePipeline, or None for a
    server without a line) provides the methods and the Ready/Counters values."""

    label = "OPC UA"

    def __init__(self, settings: OpcUaSettings, pipeline=None, *, pki_dir: str | Path | None = None):
        super().__init__()
        self.settings = settings
        self.pipeline = pipeline
        self.pki_dir = Path(pki_dir) if pki_dir else None
        self.port: int | None = None
        self.nodes: dict[str, Any] = {}
        self._server: Server | None = None
        self._stop: asyncio.Event | None = None
        self._heartbeat = 0

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.settings.host}:{self.port}/inspector/"

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> StationOpcUaServer:
        return super().start(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._join(timeout)

    async def _main(self) -> None:
        s = self.settings
        self._stop = asyncio.Event()
        self._wlock = asyncio.Lock()  # one verdict's values are written together, in order
        server = Server(user_manager=_Users(s.users, anonymous=not s.secure or s.allow_anonymous_read))
        await server.init()
        server.set_endpoint(f"opc.tcp://{s.host}:{s.port}/inspector/")
        server.set_server_name(s.name)
        await server.set_application_uri(NAMESPACE)
        if s.secure:
            cert, key = self._certificate()
            await server.load_certificate(str(cert), format=_format(cert))
            await server.load_private_key(str(key), format=_format(key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt], permission_ruleset=_Rules())
            tokens = [ua.UserNameIdentityToken] + ([ua.AnonymousIdentityToken] if s.allow_anonymous_read else [])
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity], permission_ruleset=_Rules())
            tokens = [ua.AnonymousIdentityToken]
        server.set_identity_tokens(tokens)
        await self._build(server)
        async with server:
            self._server = server
            self.port = server.bserver.port if server.bserver is not None else s.port
            log.info("opcua: serving %s (%s)", self.url, "Basic256Sha256 Sign&Encrypt + login" if s.secure
                     else "anonymous read-only")
            self._started.set()
            while not self._stop.is_set():
                await self._beat()
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=s.heartbeat_s)
                except TimeoutError:
                    pass

    def _certificate(self) -> tuple[Path, Path]:
        s = self.settings
        if s.certificate and s.private_key:
            return Path(s.certificate), Path(s.private_key)
        if s.certificate or s.private_key:
            raise ValueError("opcua: set both certificate and private_key, or neither (then one is generated)")
        base = self.pki_dir or Path("data")
        cert, key = base / "opcua" / "server-cert.pem", base / "opcua" / "server-key.pem"
        if not (cert.is_file() and key.is_file()):
            log.info("opcua: generating a self-signed server certificate in %s", cert.parent)
            make_self_signed(cert, key, uri=NAMESPACE, hosts=(s.host, "localhost"))
        return cert, key

    async def _build(self, server: Server) -> None:
        idx = await server.register_namespace(NAMESPACE)
        st = await server.nodes.objects.add_object(idx, "Station")
        prod = self.pipeline.product if self.pipeline is not None else ""
        specs = [("LastVerdict", "", ua.VariantType.String), ("Score", math.nan, ua.VariantType.Double),
                 ("FrameId", 0, ua.VariantType.UInt64), ("PartId", 0, ua.VariantType.UInt64),
                 ("LatencyMs", math.nan, ua.VariantType.Double), ("Product", prod, ua.VariantType.String),
                 ("Ready", False, ua.VariantType.Boolean), ("Heartbeat", 0, ua.VariantType.UInt64)]
        for name, value, vtype in specs:
            self.nodes[name] = await st.add_variable(idx, name, ua.Variant(value, vtype))
        counters = await st.add_object(idx, "Counters")
        for name in ("OK", "UNCERTAIN", "NG", "ERROR", "Dropped"):
            self.nodes[f"Counters/{name}"] = await counters.add_variable(idx, name, ua.Variant(0, ua.VariantType.UInt64))
        arg = ua.Argument()
        arg.Name, arg.DataType, arg.ValueRank = "product", ua.NodeId(ua.ObjectIds.String), -1
        out = ua.Argument()
        out.Name, out.DataType, out.ValueRank = "active", ua.NodeId(ua.ObjectIds.String), -1
        self.nodes["SetProduct"] = await st.add_method(idx, "SetProduct", self._set_product, [arg], [out])
        ok = ua.Argument()
        ok.Name, ok.DataType, ok.ValueRank = "accepted", ua.NodeId(ua.ObjectIds.Boolean), -1
        self.nodes["Trigger"] = await st.add_method(idx, "Trigger", self._trigger, [], [ok])
        self.nodes["Station"] = st

    # ---- methods -----------------------------------------------------------------------------
    def _may_call(self) -> bool:
        # The permission rules refuse anonymous Call requests before they get here; this second
        # check keeps a server without users read-only even if those rules change.
        return self.settings.secure

    async def _set_product(self, parent, name):
        if not self._may_call():
            return ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
        if self.pipeline is None:
            return ua.StatusCode(ua.StatusCodes.BadNotSupported)
        value = name.Value if isinstance(name, ua.Variant) else name
        try:
            active = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.set_product, str(value))
        except KeyError as exc:
            log.warning("opcua: SetProduct(%r) refused: %s", value, exc)
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        await self._write("Product", active, ua.VariantType.String)
        return [ua.Variant(active, ua.VariantType.String)]

    async def _trigger(self, parent):
        if not self._may_call():
            return ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
        if self.pipeline is None:
            return ua.StatusCode(ua.StatusCodes.BadNotSupported)
        accepted = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.trigger)
        return [ua.Variant(bool(accepted), ua.VariantType.Boolean)]

    # ---- values ------------------------------------------------------------------------------
    async def _write(self, name: str, value, vtype) -> None:
        await self.nodes[name].write_value(ua.Variant(value, vtype))

    async def _beat(self) -> None:
        self._heartbeat += 1
        await self._write("Heartbeat", self._heartbeat, ua.VariantType.UInt64)
        if self.pipeline is not None:
            await self._write("Ready", bool(self.pipeline.ready), ua.VariantType.Boolean)
            await self._write("Product", self.pipeline.product, ua.VariantType.String)
            # free-run drops publish no part verdict: keep the counter current here
            await self._write("Counters/Dropped", int(self.pipeline.counts.get("dropped", 0)), ua.VariantType.UInt64)

    async def _publish(self, v: LineVerdict, counts: dict) -> None:
        async with self._wlock:
            await self._publish_locked(v, counts)

    async def _publish_locked(self, v: LineVerdict, counts: dict) -> None:
        await self._write("LastVerdict", v.verdict, ua.VariantType.String)
        await self._write("Score", math.nan if v.score is None else float(v.score), ua.VariantType.Double)
        await self._write("FrameId", int(v.frame_id or 0), ua.VariantType.UInt64)
        await self._write("LatencyMs", v.latency_s * 1e3, ua.VariantType.Double)
        await self._write("Product", v.product, ua.VariantType.String)
        for name in ("OK", "UNCERTAIN", "NG", "ERROR"):
            await self._write(f"Counters/{name}", int(counts.get(name, 0)), ua.VariantType.UInt64)
        await self._write("Counters/Dropped", int(counts.get("dropped", 0)), ua.VariantType.UInt64)
        await self._write("PartId", int(v.part), ua.VariantType.UInt64)  # last: see module docstring

    def on_verdict(self, v: LineVerdict) -> None:
        """Pipeline listener: hand the verdict to the server's loop (returns at once)."""
        if self._loop is None or self._server is None or self._loop.is_closed():
            return
        counts = dict(self.pipeline.counts) if self.pipeline is not None else {}
        asyncio.run_coroutine_threadsafe(self._publish(v, counts), self._loop)


__all__ = ["NAMESPACE", "OpcUaSettings", "StationOpcUaServer", "make_self_signed"]
