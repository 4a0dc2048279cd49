"""Station login: salted slow password hashes, attempt rate limiting with lockout, audit of failures.

Hashes: ``scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>`` (``hashlib.scrypt``, 16-byte random salt,
n=2**14, r=8, p=1: about 16 MiB and tens of milliseconds per check, so a stolen config costs an
attacker the same per guess). ``inspector hash-password`` prints one for the ``[users]`` table.
Older forms still verify: ``sha256:<hex>`` (unsalted; a warning says to re-hash) and plain text.

:class:`LoginGuard` wraps the check. After ``max_failures`` wrong passwords for one user name
within ``window_s`` the name is locked for ``lockout_s`` (doubling on each further lockout, up to
an hour): while locked, every attempt is refused without checking the password, so guessing
stops even with the right password in the list. Unknown names are checked against a dummy hash
(same time as a real one, so timing does not reveal which names exist) and rate-limited the same
way. Every failure is passed to ``audit(user, reason, details)``; the station records it in the
store's audit table (action ``login_failed``). Thread-safe.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_MAX_TRACKED = 10_000  # bounded memory however many names an attacker tries


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash for the ``[users]`` table."""
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024**2, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${dk.hex()}"


def check_password(stored: str, given: str) -> bool:
    """Constant-time check of ``given`` against a stored scrypt, legacy sha256 or plain entry."""
    if stored.startswith("scrypt$"):
        try:
            _, n, r, p, salt, want = stored.split("$")
            dk = hashlib.scrypt(given.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                                maxmem=256 * 1024**2, dklen=len(want) // 2)
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(dk.hex(), want.lower())
    if stored.startswith("sha256:"):
        return hmac.compare_digest(stored[7:].lower(), hashlib.sha256(given.encode()).hexdigest())
    return hmac.compare_digest(stored.encode(), given.encode())


def is_weak_entry(stored: str) -> bool:
    """True for entries that are not salted slow hashes (plain text or unsalted sha256)."""
    return not stored.startswith("scrypt$")


_DUMMY = hash_password("not a password of anyone")


@dataclass
class _State:
    failures: list[float]
    locked_until: float = 0.0
    lockouts: int = 0


class LoginGuard:
    """``guard(username, password) -> bool``: the Gradio ``auth`` callable (see module docstring)."""

    def __init__(self, users: Mapping[str, str], *, max_failures: int = 5, window_s: float = 300.0,
                 lockout_s: float = 300.0, audit: Callable[[str, str, dict], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.users = dict(users)
        self.max_failures = max(1, int(max_failures))
        self.window_s = float(window_s)
        self.lockout_s = float(lockout_s)
        self.audit = audit
        self.clock = clock
        self._state: dict[str, _State] = {}
        self._lock = threading.Lock()

    def locked(self, username: str) -> float:
        """Seconds until ``username`` may try again (0 when not locked)."""
        with self._lock:
            st = self._state.get(username)
            return max(0.0, st.locked_until - self.clock()) if st else 0.0

    def __call__(self, username: str, password: str) -> bool:
        username, password = str(username or ""), str(password or "")
        now = self.clock()
        with self._lock:
            st = self._state.get(username)
            if st is not None and st.locked_until > now:
                wait = st.locked_until - now
                locked = True
            else:
                locked = False
        if locked:
            self._report(username, "locked", {"retry_after_s": round(wait, 1)})
            return False
        stored = self.users.get(username)
        ok = check_password(stored if stored is not None else _DUMMY, password) and stored is not None
        with self._lock:
            if ok:
                self._state.pop(username, None)
                return True
            st = self._state.get(username)
            if st is None:
                if len(self._state) >= _MAX_TRACKED:  # forget the oldest entry
                    self._state.pop(next(iter(self._state)))
                st = self._state[username] = _State([])
            st.failures = [t for t in st.failures if now - t < self.window_s] + [now]
            details = {"known_user": stored is not None, "failures": len(st.failures)}
            if len(st.failures) >= self.max_failures:
                st.lockouts += 1
                span = min(3600.0, self.lockout_s * 2 ** (st.lockouts - 1))
                st.locked_until = now + span
                st.failures = []
                details["locked_for_s"] = span
        self._report(username, "wrong password" if stored is not None else "unknown user", details)
        return False

    def _report(self, username: str, reason: str, details: dict) -> None:
        if self.audit is not None:
            try:
                self.audit(username, reason, details)
            except Exception:  # noqa: BLE001 - a full disk must not turn into a login bypass or crash
                pass


__all__ = ["LoginGuard", "check_password", "hash_password", "is_weak_entry"]
