"""Evidence images: every inspected image kept, content-addressed, within a disk budget.

Why: an operator's decision is worth something only with the image it was made on (a refit learns
from the pixels, not from a hash), and a station runs for years on a small disk. So every
inspected image is kept under its sha256, the disk budget is a hard limit, and what is rolled over
when it is reached is what nobody has looked at: images with a decision are **kept** (never rolled
over); **undecided** ones roll over oldest first; an image that cannot fit even then is not stored
and is **counted** as dropped (never an error: evidence must not stop an inspection).

Layout under ``root`` (``<data dir>/evidence``)::

    objects/ab/<sha256>        the image: the bytes as given (a file's own bytes), or a PNG of an array
    objects/ab/<sha256>.kept   empty marker: decided, never rolled over (survives losing the index)
    tmp/                       writes in progress, ``<host>-<pid>-<start>-<random>.tmp``
    index.sqlite               size, order and state of every image: the shared budget ledger
    lock                       ``flock``: one budget decision at a time (threads and processes)

**The budget counts image bytes** (``objects/`` and the writes under way in ``tmp/``); the index,
a few hundred bytes an image, is outside it. A put first **reserves** its size in the index under
the lock (rolling undecided images over until it fits), then writes outside the lock (so writers
of several threads and processes write in parallel), so the bytes on disk never exceed the bytes
reserved, which never exceed ``max_bytes``.

**Crash safety.** A write goes to ``tmp/``, is fsynced and renamed into ``objects/`` (and the folder
fsynced): a file under its final name is always whole, whatever kills the process. Opening the
store cleans what a killed writer left: its temp files, and its reservation (the image is stored
if its rename happened, else forgotten). The index is SQLite (transactions survive ``kill -9``);
lost or corrupt, it is rebuilt from ``objects/`` (order from file times, kept from the markers).
Rolling over deletes the file before its index row: a crash in between leaves a row without a file
(its bytes counted until its turn to roll over), never a file the budget does not count.

Costs: a put is one fsynced index transaction under the lock (the budget decision), the image's
own write and fsync outside it, and one unsynced transaction; an array is PNG-encoded first (the
larger part for a camera frame). On the line that is part of a kept part's latency.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from inspector.io import read_image, to_rgb8
from inspector.state import bytes_sha256

log = logging.getLogger(__name__)

#: The default budget (``evidence_max_gb``): sized for a small disk (a station PC's spare space).
DEFAULT_MAX_GB = 2.0
GB = 1024**3
#: A reservation or temp file of a process on another host is taken for dead after this long.
FOREIGN_STALE_S = 3600.0
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_PNG_LEVEL = 1  # zlib level of the PNGs of arrays: on a 1.3 MP frame level 1 is 7 % larger than 3 at 60 % of its time (the line waits on it)
# images.state: 'stored', or 'writing' (bytes reserved, being written by ``owner`` since ``since``);
# images.seq: insertion order (rolled over lowest first); meta: counters seq, dropped, rolled, built.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    sha TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    kept INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    owner TEXT,
    since REAL
);
CREATE INDEX IF NOT EXISTS images_roll ON images (kept, state, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_HOST = socket.gethostname()
_ROOT_LOCKS: dict[str, threading.Lock] = {}
_ROOT_LOCKS_GUARD = threading.Lock()


class EvidenceFull(OSError):
    """An image that had to be kept (an operator's mask) does not fit in the budget."""


def gb_to_bytes(gb: float | None) -> int:
    """``evidence_max_gb`` (GiB; None: :data:`DEFAULT_MAX_GB`) as a byte budget (0: keeping off)."""
    gb = DEFAULT_MAX_GB if gb is None else float(gb)
    if gb < 0:
        raise ValueError(f"evidence_max_gb must be >= 0, got {gb}")
    return int(gb * GB)


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks (``/proc``), to tell a reused pid; '' where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


_OWNER = f"{_HOST}-{os.getpid()}-{_proc_start(os.getpid())}"


def _owner() -> str:
    """This process as a writer: host, pid and start time (a forked child is another owner)."""
    global _OWNER
    if not _OWNER.startswith(f"{_HOST}-{os.getpid()}-"):
        _OWNER = f"{_HOST}-{os.getpid()}-{_proc_start(os.getpid())}"
    return _OWNER


def _owner_dead(owner: str | None, since: float | None) -> bool:
    """Whether the writer ``owner`` is gone: same host, its pid gone or reused; another host, stale."""
    if not owner:
        return True
    try:
        host, pid, start = owner.rsplit("-", 2)
        pid = int(pid)
    except ValueError:
        return True
    if host != _HOST:
        return since is not None and time.time() - since > FOREIGN_STALE_S
    if pid == os.getpid():
        return start != _proc_start(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    now = _proc_start(pid)
    return bool(start) and bool(now) and now != start


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def png_bytes(image: np.ndarray, *, mask: bool = False) -> bytes:
    """A lossless PNG of an image array (any layout :func:`inspector.io.to_rgb8` takes), or with
    ``mask`` of a mask (nonzero -> 255, one channel)."""
    if mask:
        arr = np.where(np.asarray(image) > 0, 255, 0).astype(np.uint8)
        if arr.ndim != 2:
            raise ValueError(f"a mask is HxW, got shape {arr.shape}")
    else:
        arr = cv2.cvtColor(to_rgb8(np.asarray(image)), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL])
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return buf.tobytes()


class EvidenceImages:
    """The content-addressed image store with a disk budget; see the module docstring.

    ``max_bytes <= 0`` turns keeping off (``put`` stores nothing and counts nothing; images kept
    earlier can still be read). Safe to share between threads; several processes (Ray workers,
    a CLI batch beside the station) may open the same ``root`` at once.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self._db = self.root / "index.sqlite"
        key = str(self.root.resolve())
        with _ROOT_LOCKS_GUARD:
            self._tlock = _ROOT_LOCKS.setdefault(key, threading.Lock())
        if self.enabled or self.root.is_dir():
            self.objects.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            self._open()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __repr__(self) -> str:
        return f"EvidenceImages({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ---- public ------------------------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview | np.ndarray, sha256: str, *, keep: bool = False) -> bool:
        """Store ``data`` under ``sha256`` (the bytes as given, or a PNG of an array); returns once
        it is written and fsynced. False: not stored, because the budget cannot fit it even after
        rolling over every undecided image (counted in ``usage()["dropped"]``), or keeping is off.
        An image already stored is not written again (``keep`` still marks it)."""
        sha = _check_sha(sha256)
        if not self.enabled:
            return False
        payload = png_bytes(data) if isinstance(data, np.ndarray) else bytes(data)
        n = len(payload)
        final = self._file(sha)
        deadline = time.monotonic() + 120.0
        while True:
            with self._locked() as db:
                row = db.execute("SELECT kept, state, owner, since FROM images WHERE sha=?", (sha,)).fetchone()
                if row is not None and row[1] == "writing":
                    if _owner_dead(row[2], row[3]):
                        self._settle(db, sha, row[0])
                        row = db.execute("SELECT kept, state FROM images WHERE sha=?", (sha,)).fetchone()
                    else:  # another thread or process is writing these very bytes: wait for it below
                        if keep:
                            db.execute("UPDATE images SET kept=1 WHERE sha=?", (sha,))
                        row = "wait"
                if row != "wait":
                    if final.is_file():
                        if row is None:  # stored, its row lost (index rebuilt): count it again
                            self._adopt(db, sha, final, kept=keep)
                            self._make_room(db, 0, force=True)
                        elif keep and not row[0]:
                            self._mark_kept(db, sha)
                        elif not row[0]:  # seen again: the newest of the undecided
                            db.execute("UPDATE images SET seq=? WHERE sha=?", (self._next_seq(db), sha))
                        return True
                    if row is not None:  # a row whose file is gone
                        db.execute("DELETE FROM images WHERE sha=?", (sha,))
                    if not self._make_room(db, n):
                        self._count(db, "dropped")
                        log.warning("evidence: image %s (%d bytes) dropped: the %d byte budget is full of kept "
                                    "images", sha[:12], n, self.max_bytes)
                        return False
                    db.execute("INSERT INTO images (sha, bytes, kept, seq, state, owner, since) "
                               "VALUES (?,?,?,?,?,?,?)",
                               (sha, n, int(keep), self._next_seq(db), "writing", _owner(), time.time()))
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"evidence image {sha[:12]}: another writer has not finished it in 120 s")
            time.sleep(0.005)
        try:
            self._write(final, payload)
        except BaseException:
            with self._locked() as db:
                db.execute("DELETE FROM images WHERE sha=? AND state='writing' AND owner=?", (sha, _owner()))
            raise
        # Settling needs no fsync: lost in a power cut, the reservation is settled by the next opener.
        with self._locked(durable=False) as db:
            row = db.execute("SELECT kept FROM images WHERE sha=? AND state='writing'", (sha,)).fetchone()
            if row is None:  # settled meanwhile by an opener that took this process for dead: count it again
                self._adopt(db, sha, final, kept=keep)
                self._make_room(db, 0, force=True)
            else:
                self._settle(db, sha, row[0])
        return True

    def keep(self, sha256: str) -> bool:
        """Mark an image decided: never rolled over. False when it is not stored (rolled over or
        dropped before its decision)."""
        sha = _check_sha(sha256)
        if not self.root.is_dir():
            return False
        with self._locked() as db:
            row = db.execute("SELECT kept, state FROM images WHERE sha=?", (sha,)).fetchone()
            final = self._file(sha)
            if row is None:
                if not final.is_file():
                    return False
                self._adopt(db, sha, final, kept=True)
                return True
            if row[1] == "writing":
                db.execute("UPDATE images SET kept=1 WHERE sha=?", (sha,))
                return True
            if not final.is_file():
                db.execute("DELETE FROM images WHERE sha=?", (sha,))
                return False
            if not row[0]:
                self._mark_kept(db, sha)
            return True

    def release(self, sha256: str) -> bool:
        """Undo :meth:`keep` (no product version uses the image any more): it becomes undecided
        and rolls over in its turn. False when it is not stored."""
        sha = _check_sha(sha256)
        if not self.root.is_dir():
            return False
        with self._locked() as db:
            cur = db.execute("UPDATE images SET kept=0 WHERE sha=? AND state='stored'", (sha,))
            self._marker(sha).unlink(missing_ok=True)
            return cur.rowcount > 0

    def has(self, sha256: str) -> bool:
        return self.path(sha256) is not None

    def path(self, sha256: str) -> Path | None:
        """The stored file (whole: files appear under their name only once written), or None."""
        p = self._file(_check_sha(sha256))
        return p if p.is_file() else None

    def read(self, sha256: str) -> np.ndarray:
        """The stored image as RGB uint8 (``KeyError`` when not stored)."""
        p = self.path(sha256)
        if p is None:
            raise KeyError(f"evidence image {sha256} is not stored")
        return read_image(p.read_bytes(), name=f"evidence {sha256[:12]}")

    def is_kept(self, sha256: str) -> bool:
        return self._marker(_check_sha(sha256)).is_file() and self.has(sha256)

    def put_mask(self, mask: np.ndarray) -> str:
        """Store an operator's mask (HxW, nonzero = defect) as a 0/255 PNG, content-addressed and
        kept; returns its sha256. :class:`EvidenceFull` when the budget cannot fit it."""
        data = png_bytes(mask, mask=True)
        sha = bytes_sha256(data)
        if not self.put(data, sha, keep=True):
            raise EvidenceFull(f"evidence store full: no room for a {len(data)} byte mask "
                               f"(budget {self.max_bytes} bytes, all kept)")
        return sha

    def read_mask(self, sha256: str) -> np.ndarray:
        """A mask stored by :meth:`put_mask` as HxW bool (``KeyError`` when not stored)."""
        p = self.path(sha256)
        if p is None:
            raise KeyError(f"evidence mask {sha256} is not stored")
        arr = cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
        if arr is None:
            raise ValueError(f"evidence {sha256[:12]} is not a mask PNG")
        return arr > 127

    def usage(self) -> dict:
        """``bytes``/``files`` stored, ``kept`` and ``pending`` (undecided) counts, ``dropped`` (did
        not fit) and ``rolled`` (rolled over) since the store was created, ``kept_bytes``,
        ``reserved_bytes`` (writes under way) and ``max_bytes``."""
        out = dict(bytes=0, files=0, kept=0, pending=0, kept_bytes=0, reserved_bytes=0, dropped=0, rolled=0,
                   max_bytes=self.max_bytes)
        if not self._db.is_file():
            return out
        with contextlib.closing(self._connect()) as db:
            for kept, state, n, b in db.execute(
                    "SELECT kept, state, count(*), coalesce(sum(bytes), 0) FROM images GROUP BY kept, state"):
                if state == "writing":
                    out["reserved_bytes"] += b
                    continue
                out["files"] += n
                out["bytes"] += b
                out["kept" if kept else "pending"] += n
                if kept:
                    out["kept_bytes"] += b
            for key, value in db.execute("SELECT key, value FROM meta WHERE key IN ('dropped', 'rolled')"):
                out[key] = value
        return out

    def shas(self, *, kept: bool | None = None) -> list[str]:
        """Stored images, oldest first (``kept``: only kept, or only undecided)."""
        if not self._db.is_file():
            return []
        q = "SELECT sha FROM images WHERE state='stored'"
        if kept is not None:
            q += f" AND kept={int(bool(kept))}"
        with contextlib.closing(self._connect()) as db:
            return [r[0] for r in db.execute(q + " ORDER BY seq")]

    # ---- internals ---------------------------------------------------------------------------
    def _file(self, sha: str) -> Path:
        return self.objects / sha[:2] / sha

    def _marker(self, sha: str) -> Path:
        return self.objects / sha[:2] / f"{sha}.kept"

    def _connect(self, durable: bool = True) -> sqlite3.Connection:
        db = sqlite3.connect(self._db, timeout=60, isolation_level=None)
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        return db

    @contextlib.contextmanager
    def _locked(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """The index in one transaction, under this process's lock for ``root`` and the ``flock``
        on ``root/lock`` (the other processes). ``durable=False``: the commit is not fsynced (it
        survives a killed process, not a power cut): for what :meth:`_recover` redoes anyway."""
        with self._tlock:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                db = self._connect(durable)
                try:
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        yield db
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                    db.execute("COMMIT")
                finally:
                    db.close()
            finally:
                os.close(fd)  # releases the flock

    def _open(self) -> None:
        """Create or check the index, then clean what killed writers left and fit the budget."""
        fresh = not self._db.is_file()
        try:
            with self._locked() as db:
                _create(db)
                if db.execute("SELECT value FROM meta WHERE key='built'").fetchone() is None:
                    fresh = True
        except sqlite3.DatabaseError as exc:  # a corrupt index: set it aside and rebuild from the files
            log.error("evidence: index %s unreadable (%s); rebuilding it from the files", self._db, exc)
            self._db.rename(self._db.with_name(f"index.sqlite.corrupt-{int(time.time())}"))
            for side in ("-journal", "-wal", "-shm"):
                Path(f"{self._db}{side}").unlink(missing_ok=True)
            fresh = True
            with self._locked() as db:
                _create(db)
        with self._locked() as db:
            if fresh:
                self._rebuild(db)
            self._recover(db)
            self._fit(db)

    def _rebuild(self, db: sqlite3.Connection) -> None:
        """The index from ``objects/`` (kept from the markers, order from file times)."""
        found = []
        for shard in self.objects.iterdir() if self.objects.is_dir() else ():
            if not shard.is_dir():
                continue
            for p in shard.iterdir():
                if _SHA_RE.fullmatch(p.name):
                    st = p.stat()
                    found.append((st.st_mtime, p.name, st.st_size))
                elif p.name.endswith(".kept") and not (shard / p.name[:-5]).is_file():
                    p.unlink(missing_ok=True)  # a marker whose image is gone
        db.execute("DELETE FROM images WHERE state='stored'")
        for _, sha, size in sorted(found):
            db.execute("INSERT OR REPLACE INTO images (sha, bytes, kept, seq, state) VALUES (?,?,?,?, 'stored')",
                       (sha, size, int(self._marker(sha).is_file()), self._next_seq(db)))
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('built', 1)")
        if found:
            log.info("evidence: index rebuilt from %d files in %s", len(found), self.objects)

    def _recover(self, db: sqlite3.Connection) -> int:
        """Forget dead writers: their temp files, and their reservations (stored if the rename
        happened, else dropped). Returns the number of reservations settled."""
        for p in self.tmp.iterdir() if self.tmp.is_dir() else ():
            owner = p.name.rsplit("-", 1)[0]
            try:
                since = p.stat().st_mtime
            except FileNotFoundError:
                continue
            if _owner_dead(owner, since):
                p.unlink(missing_ok=True)
        n = 0
        for sha, kept, owner, since in db.execute(
                "SELECT sha, kept, owner, since FROM images WHERE state='writing'").fetchall():
            if not _owner_dead(owner, since):
                continue
            n += 1
            self._settle(db, sha, kept)
        return n

    def _settle(self, db: sqlite3.Connection, sha: str, kept: int) -> None:
        """A reservation whose write is over: stored if its file landed, else forgotten."""
        final = self._file(sha)
        if final.is_file():
            db.execute("UPDATE images SET state='stored', owner=NULL, since=NULL, bytes=? WHERE sha=?",
                       (final.stat().st_size, sha))
            if kept:
                self._marker(sha).touch()
        else:
            db.execute("DELETE FROM images WHERE sha=?", (sha,))

    def _fit(self, db: sqlite3.Connection) -> None:
        """A budget lowered since the images were stored: roll undecided ones over until it fits
        (kept images stay, even above it; then nothing new is stored until there is room)."""
        if self.enabled and self._used(db) > self.max_bytes:
            self._make_room(db, 0, force=True)

    def _used(self, db: sqlite3.Connection) -> int:
        return db.execute("SELECT coalesce(sum(bytes), 0) FROM images").fetchone()[0]

    def _make_room(self, db: sqlite3.Connection, n: int, force: bool = False) -> bool:
        """Roll undecided images over, oldest first, until ``n`` more bytes fit. Nothing is rolled
        over for an image that would not fit anyway (unless ``force``)."""
        used = self._used(db)
        if used + n <= self.max_bytes:
            return True
        fixed = db.execute("SELECT coalesce(sum(bytes), 0) FROM images WHERE kept=1 OR state='writing'").fetchone()[0]
        if fixed + n > self.max_bytes and not force:
            if self._recover(db) == 0:  # a dead writer's reservation may be what is in the way
                return False
            return self._make_room(db, n)
        for sha, size in db.execute("SELECT sha, bytes FROM images WHERE kept=0 AND state='stored' ORDER BY seq"
                                    ).fetchall():
            if used + n <= self.max_bytes:
                break
            self._file(sha).unlink(missing_ok=True)  # the file first: a crash leaves a row, never a file
            db.execute("DELETE FROM images WHERE sha=?", (sha,))
            self._count(db, "rolled")
            used -= size
        return used + n <= self.max_bytes

    def _adopt(self, db: sqlite3.Connection, sha: str, final: Path, kept: bool) -> None:
        db.execute("INSERT OR REPLACE INTO images (sha, bytes, kept, seq, state) VALUES (?,?,?,?, 'stored')",
                   (sha, final.stat().st_size, int(kept or self._marker(sha).is_file()), self._next_seq(db)))
        if kept:
            self._marker(sha).touch()

    def _mark_kept(self, db: sqlite3.Connection, sha: str) -> None:
        self._marker(sha).touch()
        db.execute("UPDATE images SET kept=1 WHERE sha=?", (sha,))

    def _next_seq(self, db: sqlite3.Connection) -> int:
        return self._count(db, "seq")

    def _count(self, db: sqlite3.Connection, key: str) -> int:
        db.execute("INSERT INTO meta (key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value=value+1", (key,))
        return db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]

    def _write(self, final: Path, payload: bytes) -> None:
        """temp file in ``tmp/`` + fsync + rename + folder fsync: whole or absent, never torn."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{_owner()}-{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)


def _create(db: sqlite3.Connection) -> None:
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)


def _check_sha(sha256: str) -> str:
    """A sha256 in lower-case hex (it becomes a file name: nothing else may)."""
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


__all__ = ["DEFAULT_MAX_GB", "EvidenceFull", "EvidenceImages", "gb_to_bytes", "png_bytes"]
