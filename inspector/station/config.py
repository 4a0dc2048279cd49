"""Station configuration: safe defaults, a TOML file, environment variables, CLI flags.

Precedence (later wins): defaults < config file < environment < command-line flags.

Defaults are the safe ones: bind ``127.0.0.1`` (this machine only), no login, uploads limited
to 25 MB, folder batches only below the configured roots, a bounded queue.

Example ``station.toml``::

    host = "0.0.0.0"            # listen on the network: then set users!
    port = 7860
    data_dir = "/var/lib/inspector"
    max_file_size = "25mb"
    allowed_batch_roots = ["/srv/line1/images", "/mnt/nas/inspection"]
    concurrency = 4             # requests served at once (model calls are still serialised)
    camera = "rtsp://cam1.local/stream"   # the Live tab's default source (configured: allowed)
    camera_urls = ["rtsp://cam2.local/stream"]   # further stream URLs operators may pick
    live_interval = 1.0         # seconds between live inspections
    login_max_failures = 5      # wrong passwords per user name before a lockout...
    login_lockout_s = 300       # ...of this long (doubling on repeat offences)
    evidence_max_gb = 2.0       # disk kept for inspected images (evidence for the learning loop); 0: keep none

    [cameras]                   # named sources: operators type the name
    line1 = "rtsp://cam1.local/stream"
    replay = "/srv/line1/replay"

    [users]                     # optional login; `inspector hash-password` prints a scrypt hash
    alice = "scrypt$16384$8$1$<salt hex>$<hash hex>"
    bob = "s3cret"              # plain text still works, with a warning at start-up

Camera sources are configuration, not request input: the station opens only a configured source
(``camera``, a ``[cameras]`` name or value, a ``camera_urls`` entry) or a folder (or video file)
that lies, after symlink resolution, under ``allowed_batch_roots``. Anything else -- another
folder, ``http://127.0.0.1:.../`` (server-side request forgery), a device index -- is refused with
one message that says nothing about what exists (:meth:`StationConfig.camera_source`).

Environment: ``INSPECTOR_HOST``, ``INSPECTOR_PORT``, ``INSPECTOR_DATA``, ``INSPECTOR_CONFIG``
(path of the file), ``INSPECTOR_USERS`` (``"alice:pw,bob:sha256:..."``),
``INSPECTOR_MAX_FILE_SIZE``, ``INSPECTOR_BATCH_ROOTS`` (``os.pathsep``-separated),
``INSPECTOR_CONCURRENCY``, ``INSPECTOR_CAMERA``, ``INSPECTOR_RAY_ADDRESS`` (Batch tab on a Ray cluster),
``INSPECTOR_EVIDENCE_MAX_GB``.

Security notes for the whole station: README.md, "Security notes".
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from inspector.errors import InspectorError
from inspector.paths import within
from inspector.products.feedback.images import DEFAULT_MAX_GB
from inspector.security.passwords import LoginGuard, is_weak_entry

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


__all__ = ["CAMERA_REFUSED", "ConfigError", "SourceNotAllowed", "StationConfig"]


class ConfigError(InspectorError, ValueError):
    """A bad configuration value; the message names the key and the source."""


#: the one answer to a refused camera source: it must not reveal which folders or hosts exist
CAMERA_REFUSED = ("camera source not allowed: choose a configured camera, or a folder under the "
                  "allowed roots")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SourceNotAllowed(InspectorError, PermissionError):
    """A camera source outside the configuration (message: :data:`CAMERA_REFUSED`, always)."""

    def __init__(self):
        super().__init__(CAMERA_REFUSED)


@dataclass
class StationConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path | None = None
    users: dict[str, str] = field(default_factory=dict)
    max_file_size: str | int = "25mb"
    allowed_batch_roots: list[Path] = field(default_factory=list)
    concurrency: int = 4
    max_queue: int = 64
    camera: str | None = None
    #: named camera sources (name -> spec); names and values are both accepted
    cameras: dict[str, str] = field(default_factory=dict)
    #: stream URLs allowed besides the configured ones (exact match)
    camera_urls: list[str] = field(default_factory=list)
    live_interval: float = 1.0
    #: login: wrong passwords per user name (within 5 minutes) before a lockout of login_lockout_s
    login_max_failures: int = 5
    login_lockout_s: float = 300.0
    #: keep extracted zip uploads after their batch (default: deleted; rows and heatmaps stay)
    keep_uploads: bool = False
    title: str = "Inspection station"
    #: backbones offered in the Register tab (test configs may add "tiny-cnn")
    backbones: list[str] = field(default_factory=lambda: ["efficientnet-lite0"])
    detectors: list[str] = field(default_factory=lambda: ["graphcore", "musc", "anomalyclip"])
    #: input resolutions offered in the Register tab (first = default)
    image_sizes: list[int] = field(default_factory=lambda: [256, 224, 320, 128])
    #: Batch tab: run batches on this Ray cluster ("auto", "ray://head:10001"); None: on the station
    ray_address: str | None = None
    #: batches from uploaded zip files: limits against zip bombs
    max_zip_members: int = 5000
    max_zip_bytes: int = 2 * 1024**3
    #: disk budget (GiB) of the evidence image store (inspector.products.feedback.images): every
    #: inspected image is kept, undecided ones roll over oldest first; sized for a small disk; 0: off
    evidence_max_gb: float = DEFAULT_MAX_GB
    #: the ``[line]`` tables (camera, trigger, OPC UA, Modbus, metrics): inspector.line.config.LineConfig
    line: dict = field(default_factory=dict)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> StationConfig:
        """Defaults, then ``path`` (or ``$INSPECTOR_CONFIG``), then environment, then the
        non-``None`` keyword ``overrides`` (the CLI flags)."""
        env = os.environ if env is None else env
        cfg = cls()
        path = path or env.get("INSPECTOR_CONFIG")
        if path:
            cfg.update(_read_toml(Path(path)), source=str(path))
        cfg.update(_from_env(env), source="environment")
        cfg.update({k: v for k, v in overrides.items() if v is not None}, source="command line")
        cfg.validate()
        return cfg

    def update(self, values: Mapping[str, Any], source: str = "config") -> None:
        known = {f.name: f for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
            try:
                setattr(self, key, _coerce(key, value))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: bad value for {key!r}: {exc}") from exc

    def validate(self) -> None:
        if not (0 < self.port < 65536):
            raise ConfigError(f"port must be 1-65535, got {self.port}")
        if self.concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        if self.live_interval <= 0:
            raise ConfigError("live_interval must be > 0")
        if not self.evidence_max_gb >= 0:  # (NaN too)
            raise ConfigError(f"evidence_max_gb must be >= 0 (0: keep no images), got {self.evidence_max_gb}")
        for user, pw in self.users.items():
            if not user or not pw:
                raise ConfigError("users: empty user name or password")
        if self.line:
            from inspector.line.config import LineConfig

            try:
                LineConfig.from_dict(self.line)
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc)) from exc

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_loopback(self) -> bool:
        if self.host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def auth(self, audit=None, clock=None):
        """A Gradio ``auth`` callable (a rate-limited :class:`~inspector.security.passwords.LoginGuard`), or
        ``None`` when no users are configured. ``audit(user, reason, details)`` gets each failure."""
        if not self.users:
            return None
        kw = {"clock": clock} if clock is not None else {}
        return LoginGuard(self.users, max_failures=self.login_max_failures, lockout_s=self.login_lockout_s,
                          audit=audit, **kw)

    def warnings(self) -> list[str]:
        out = []
        if not self.is_loopback and not self.users:
            out.append(f"listening on {self.host} without login: anyone on the network can use the station "
                       "(set [users] in the config file or INSPECTOR_USERS)")
        weak = sorted(u for u, pw in self.users.items() if is_weak_entry(pw))
        if weak:
            out.append(f"users {', '.join(weak)}: password stored as plain text or unsalted sha256; replace it "
                       "with the output of `inspector hash-password`")
        return out

    def camera_source(self, spec: str | int | None) -> str:
        """The source to open for a requested camera ``spec``, or :class:`SourceNotAllowed`.

        Allowed: a ``[cameras]`` name (-> its value), a configured spec verbatim (``camera``,
        a ``[cameras]`` value, a ``camera_urls`` entry), or a path that resolves (symlinks
        followed) under ``allowed_batch_roots`` (-> the resolved path: folder replay or a video
        file). A folder under the roots need not exist yet (a hot folder may come and go)."""
        s = str(spec if spec is not None else "").strip()
        if not s:
            raise SourceNotAllowed()
        if s in self.cameras:
            return str(self.cameras[s])
        configured = {str(v) for v in self.cameras.values()} | set(self.camera_urls)
        if self.camera:
            configured.add(str(self.camera))
        if s in configured:
            return s
        if _URL_RE.match(s) or re.fullmatch(r"\d{1,3}", s) or not self.allowed_batch_roots:
            raise SourceNotAllowed()
        try:
            s.encode("utf-8")
            p = os.path.realpath(Path(s).expanduser())
        except (UnicodeEncodeError, OSError, ValueError):
            raise SourceNotAllowed() from None
        if not within(p, self.allowed_batch_roots):
            raise SourceNotAllowed()
        return p

    def batch_folder_allowed(self, folder: str | os.PathLike) -> Path:
        """Resolve ``folder`` (symlinks included) and return it if it lies under an allowed root;
        raise :class:`PermissionError` otherwise."""
        if not self.allowed_batch_roots:
            raise PermissionError("folder batches are disabled: no allowed_batch_roots configured "
                                  "(upload a zip instead)")
        p = Path(folder).expanduser().resolve()
        for root in self.allowed_batch_roots:
            r = Path(root).expanduser().resolve()
            if p == r or r in p.parents:
                return p
        roots = ", ".join(str(r) for r in self.allowed_batch_roots)
        raise PermissionError(f"{folder} is outside the allowed batch folders ({roots})")


def _coerce(key: str, value: Any) -> Any:
    if key == "port" or key in ("concurrency", "max_queue", "max_zip_members", "max_zip_bytes",
                                "login_max_failures"):
        return int(value)
    if key in ("live_interval", "login_lockout_s", "evidence_max_gb"):
        return float(value)
    if key == "keep_uploads":
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
    if key == "cameras":
        return {str(k): str(v) for k, v in dict(value).items()}
    if key == "camera_urls":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]
    if key == "data_dir":
        return Path(value).expanduser() if value else None
    if key == "allowed_batch_roots":
        if isinstance(value, str):
            value = [v for v in value.split(os.pathsep) if v]
        return [Path(v).expanduser() for v in value]
    if key == "image_sizes":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return [int(v) for v in value]
    if key in ("backbones", "detectors"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    if key == "users":
        if isinstance(value, str):
            return _parse_users(value)
        return {str(k): str(v) for k, v in dict(value).items()}
    if key == "max_file_size":
        return value if isinstance(value, int) else str(value)
    return value


def _parse_users(text: str) -> dict[str, str]:
    """``"alice:pw,bob:sha256:abc"`` -> ``{"alice": "pw", "bob": "sha256:abc"}``."""
    users = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"user entry {item!r} is not 'name:password'")
        name, pw = item.split(":", 1)
        users[name.strip()] = pw
    return users


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    base = path.parent
    for key in ("data_dir",):
        if isinstance(data.get(key), str) and not Path(data[key]).expanduser().is_absolute():
            data[key] = str(base / data[key])
    if isinstance(data.get("allowed_batch_roots"), list):
        data["allowed_batch_roots"] = [v if Path(v).expanduser().is_absolute() else str(base / v)
                                       for v in data["allowed_batch_roots"]]
    return data


_ENV = {
    "INSPECTOR_HOST": "host",
    "INSPECTOR_PORT": "port",
    "INSPECTOR_DATA": "data_dir",
    "INSPECTOR_USERS": "users",
    "INSPECTOR_MAX_FILE_SIZE": "max_file_size",
    "INSPECTOR_BATCH_ROOTS": "allowed_batch_roots",
    "INSPECTOR_CONCURRENCY": "concurrency",
    "INSPECTOR_CAMERA": "camera",
    "INSPECTOR_RAY_ADDRESS": "ray_address",
    "INSPECTOR_CAMERA_URLS": "camera_urls",
    "INSPECTOR_EVIDENCE_MAX_GB": "evidence_max_gb",
}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    return {key: env[name] for name, key in _ENV.items() if env.get(name)}
