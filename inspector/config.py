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
    camera = "rtsp://cam1.local/stream"
    live_interval = 1.0         # seconds between live inspections

    [users]                     # optional login; passwords plain or "sha256:<hex>"
    alice = "sha256:e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f"   # "change-me"
    bob = "s3cret"

Environment: ``INSPECTOR_HOST``, ``INSPECTOR_PORT``, ``INSPECTOR_DATA``, ``INSPECTOR_CONFIG``
(path of the file), ``INSPECTOR_USERS`` (``"alice:pw,bob:sha256:..."``),
``INSPECTOR_MAX_FILE_SIZE``, ``INSPECTOR_BATCH_ROOTS`` (``os.pathsep``-separated),
``INSPECTOR_CONCURRENCY``, ``INSPECTOR_CAMERA``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the source."""


def hash_password(password: str) -> str:
    """The ``sha256:<hex>`` form accepted in the ``[users]`` table."""
    return "sha256:" + hashlib.sha256(password.encode()).hexdigest()


def check_password(stored: str, given: str) -> bool:
    if stored.startswith("sha256:"):
        return hmac.compare_digest(stored[7:].lower(), hashlib.sha256(given.encode()).hexdigest())
    return hmac.compare_digest(stored.encode(), given.encode())


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
    live_interval: float = 1.0
    title: str = "Inspection station"
    #: backbones offered in the Register tab (test configs may add "tiny-cnn")
    backbones: list[str] = field(default_factory=lambda: ["efficientnet-lite0"])
    detectors: list[str] = field(default_factory=lambda: ["graphcore", "musc", "anomalyclip"])
    #: input resolutions offered in the Register tab (first = default)
    image_sizes: list[int] = field(default_factory=lambda: [256, 224, 320, 128])
    #: batches from uploaded zip files: limits against zip bombs
    max_zip_members: int = 5000
    max_zip_bytes: int = 2 * 1024**3

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
        for user, pw in self.users.items():
            if not user or not pw:
                raise ConfigError("users: empty user name or password")

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_loopback(self) -> bool:
        if self.host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def auth(self):
        """A Gradio ``auth`` callable, or ``None`` when no users are configured."""
        if not self.users:
            return None
        users = dict(self.users)

        def check(username: str, password: str) -> bool:
            stored = users.get(username)
            return stored is not None and check_password(stored, password)

        return check

    def warnings(self) -> list[str]:
        out = []
        if not self.is_loopback and not self.users:
            out.append(f"listening on {self.host} without login: anyone on the network can use the station "
                       "(set [users] in the config file or INSPECTOR_USERS)")
        return out

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
    if key == "port" or key in ("concurrency", "max_queue", "max_zip_members", "max_zip_bytes"):
        return int(value)
    if key == "live_interval":
        return float(value)
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
}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    return {key: env[name] for name, key in _ENV.items() if env.get(name)}
