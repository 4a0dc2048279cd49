"""What every batch engine shares: loading a file, the rows it records, heatmaps, the summary,
progress.

Why one module: the local engine (:mod:`inspector.batch.local`) and the Ray engine
(:mod:`inspector.batch.ray`) resume each other's batches and write the same store, so they must
agree on every rule that shapes a row. Those rules are stated once here:

* **loading** (:func:`iter_files`, :func:`load_file`, :func:`decode_file`): what a folder yields,
  how a file is read, hashed, decoded and reduced to the model's input size plus a display copy;
  a file that cannot be scored becomes a :class:`Loaded` item with its reason, never an exception;
* **evidence**: a file that decodes is kept in the evidence store (its bytes, under the sha256 its
  row records: the station's rule for a file) when it is loaded, so before its row commits;
* **rows**: :func:`result_row` for a scored file, :func:`error_row` for anything that got no
  score (a bad file, a file whose scoring failed, and beyond batches a bad upload at the station,
  a part dropped on the line, a row the store could not write) -- one ERROR row everywhere;
* **scoring** (:func:`score_items`): the same mini-batch step for both engines, so identical scores;
* **heatmaps** (:func:`heatmap_file`, :func:`scored_rows`, :func:`settle_heatmaps`): where a PNG
  goes, and the fallback (a PNG that could not be written is dropped from its row, the score is
  still recorded);
* **identity and places** (:func:`batch_id_for`, :func:`report_dir`, :func:`heatmap_dir`);
* **the end** (:func:`summarize`, :class:`BatchSummary`) and progress (:class:`BatchProgress`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from inspector import io as imio
from inspector.products.heatmap import MAX_SIDE, save_heatmap
from inspector.state import bytes_sha256
from inspector.verdict import ERROR

log = logging.getLogger(__name__)

HEATMAP_MODES = ("all", "flagged", "none")


# ----------------------------------------------------------------------------------------------
# Identity and places
# ----------------------------------------------------------------------------------------------
def batch_id_for(key: str | os.PathLike, product: str, version: str, resume: bool = True) -> str:
    """The batch id of ``key`` (a folder, a glob or a manifest) scored by one product version: the
    same for every run, so a rerun resumes it; ``resume=False`` gives a new batch (a random suffix)."""
    key = f"{Path(key).resolve()}\0{product}\0{version}"
    batch_id = bytes_sha256(key.encode())[:16]
    return batch_id if resume else f"{batch_id}-{uuid.uuid4().hex[:8]}"


def report_dir(data_dir: Path, batch_id: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Where a batch's reports go: ``out_dir``, else ``<data dir>/batches/<batch id>``."""
    return Path(out_dir) if out_dir else Path(data_dir) / "batches" / batch_id


def heatmap_dir(data_dir: str | os.PathLike, batch_id: str) -> Path:
    """Where a batch's heatmap PNGs go: ``<data dir>/heatmaps/batches/<batch id>``."""
    return Path(data_dir) / "heatmaps" / "batches" / batch_id


def check_heatmaps(heatmaps: str) -> None:
    if heatmaps not in HEATMAP_MODES:
        raise ValueError(f"heatmaps must be one of {HEATMAP_MODES}, got {heatmaps!r}")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """One file of a batch, read: its bytes' sha256, the image the model gets (already at its input
    size when a resize was given), or the reason it cannot be scored."""

    path: Path
    sha256: str | None
    rgb: np.ndarray | None  # what the model gets (already at its input size when prepared)
    error: str | None
    view: np.ndarray | None = None  # display copy for the heatmap


def display_copy(rgb: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    s = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def iter_files(folder: Path, exclude: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Every entry under ``folder`` that is not a real sub-folder (recursive, sorted, hidden names
    skipped), lazily. Never raises: what cannot be scored is still yielded, so that it gets its
    ERROR row from :func:`load_file` -- dangling links, link loops, links to folders (not
    followed), FIFOs and devices, and folders that cannot be listed (yielded themselves)."""
    excl = {os.path.realpath(p) for p in exclude}
    stack = [Path(folder)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            if d != folder:
                yield d  # an unreadable sub-folder: one ERROR row says so
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            try:
                real_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                real_dir = False
            if real_dir:
                if os.path.realpath(p) not in excl:
                    subdirs.append(p)
            else:
                yield p
        stack.extend(reversed(subdirs))


def decode_file(path: Path, data: bytes, name: str, max_pixels: int | None = None,
                resize: Callable | None = None, evidence=None) -> Loaded:
    """Hash + decode the bytes of one file; never raises for bad input (returns the reason).
    ``resize``: the model's input resize (``Preprocess.resize``); then a display copy is kept too.
    ``evidence``: an :class:`~inspector.products.feedback.images.EvidenceImages` that keeps the
    bytes of a file that decodes (under its sha256; a file that does not is no evidence)."""
    sha = bytes_sha256(data)
    try:
        rgb = imio.read_image(data, max_pixels=max_pixels, name=name)
    except imio.ImageError as exc:
        return Loaded(path, sha, None, exc.reason)
    except Exception as exc:  # a decoder crash on a hostile file is that file's problem only
        return Loaded(path, sha, None, f"unreadable image ({type(exc).__name__}: {exc})")
    if evidence is not None:
        keep_evidence(evidence, data, sha)
    if resize is None:
        return Loaded(path, sha, rgb, None, rgb)
    return Loaded(path, sha, resize(rgb), None, display_copy(rgb))


def keep_evidence(evidence, data: bytes, sha: str) -> bool:
    """Keep one file's bytes in the evidence store; a failure (disk error) is logged, never
    raised: evidence must not stop a batch."""
    try:
        return evidence.put(data, sha)
    except Exception:  # noqa: BLE001
        log.exception("evidence: could not keep image %s", sha[:12])
        return False


def load_file(path: Path, max_pixels: int | None = None, resize: Callable | None = None,
              roots: tuple[Path, ...] | None = None, evidence=None) -> Loaded:
    """Read + hash + decode one local file; never raises for bad input (returns the reason).
    ``resize``: the model's input resize (``Preprocess.resize``), applied here in the worker.
    ``roots``: the opened file (symlinks resolved) must lie under one of them.
    ``evidence``: where the file's bytes are kept (see :func:`decode_file`)."""
    try:
        if os.path.islink(path) and os.path.isdir(path):
            raise imio.ImageError(str(path), "a link to a folder (not followed)")
        data = imio.read_file_bytes(path, str(path), roots=roots)
    except imio.ImageError as exc:
        return Loaded(path, None, None, exc.reason)
    except Exception as exc:  # noqa: BLE001 - one file's problem only
        return Loaded(path, None, None, f"unreadable ({type(exc).__name__}: {exc})")
    return decode_file(path, data, str(path), max_pixels, resize, evidence)


# ----------------------------------------------------------------------------------------------
# Scoring and rows
# ----------------------------------------------------------------------------------------------
@dataclass
class Scored:
    item: Loaded
    score: float
    map: np.ndarray  # at the model's input size, raw score units
    ms: float  # model time per image in its mini-batch


def score_items(registry, prod, items: list[Loaded], runtime: str = "torch") -> list[Scored]:
    """THE scoring step of every batch engine (local and Ray), so both give identical scores. A
    mini-batch that fails as a whole is split to isolate the failing file(s): those get
    ``item.error`` set and are left out of the result."""
    try:
        res, ms = registry.score(prod, [it.rgb for it in items], runtime)
        return [Scored(it, float(s), m, ms) for it, m, s in zip(items, res.maps.numpy(), res.scores.tolist())]
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if len(items) == 1:
            items[0].error = f"scoring failed ({type(exc).__name__}: {exc})"
            items[0].rgb = items[0].view = None
            return []
        return [sc for it in items for sc in score_items(registry, prod, [it], runtime)]


def error_row(product: str, model_version: str | None, source: str, error: str, *,
              image_sha256: str | None = None, batch_id: str | None = None) -> dict:
    """THE row of anything that got no score: verdict ERROR, no score, and the reason. Used by the
    batch engines, the station (a bad image), the line (a dropped part) and the store (a row it
    could not write); ``store.record_inspection(**error_row(...))`` records one."""
    return dict(product=product, source=source, image_sha256=image_sha256, score=None, verdict=ERROR,
                model_version=model_version, batch_id=batch_id, error=error)


def heatmap_file(hm_dir: Path, root: Path | None, path: Path) -> Path:
    """Where a batch file's heatmap PNG goes: a hash of its path relative to the batch root (the
    absolute path for a file outside it, e.g. from a manifest) plus its stem."""
    try:
        rel = path.relative_to(root) if root is not None else path
    except ValueError:
        rel = path
    tag = hashlib.sha1(os.fsencode(rel)).hexdigest()[:10]
    stem = re.sub(r"[^\w.-]", "_", path.stem[:60])  # any name (non-UTF-8 too) gives a writable one
    return hm_dir / f"{tag}_{stem}.png"


def result_row(prod, batch_id: str, sc: Scored, heatmaps: str, hm_dir: Path, root: Path | None,
               source: str | None = None) -> tuple[dict, Path | None]:
    """The store row of one scored file and the heatmap PNG it should get (None: no PNG)."""
    verdict = prod.thresholds.decide(sc.score)
    hp = None
    if heatmaps == "all" or (heatmaps == "flagged" and verdict.value != "OK"):
        hp = heatmap_file(hm_dir, root, sc.item.path)
    return dict(product=prod.name, source=source or str(sc.item.path), image_sha256=sc.item.sha256,
                score=sc.score, verdict=verdict.value, heatmap_path=None if hp is None else str(hp),
                model_version=prod.version, latency_ms=sc.ms, batch_id=batch_id), hp


# ----------------------------------------------------------------------------------------------
# Heatmaps
# ----------------------------------------------------------------------------------------------
def _run_now(fn, *args, **kwargs) -> Future:
    """``fn`` called here, its outcome as a done :class:`Future` (an executor's ``submit`` that waits)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - reported by settle_heatmaps
        fut.set_exception(exc)
    return fut


def scored_rows(prod, batch_id: str, scored: list[Scored], heatmaps: str, hm_dir: Path, root: Path | None,
                submit: Callable[..., Future] | None = None) -> tuple[list[dict], list[Future]]:
    """Rows for scored items and the futures of their heatmap PNGs, written with ``submit`` (an
    executor's, so they are written while the model works on; None: written now). The caller
    commits the rows only after :func:`settle_heatmaps`, so a committed row's heatmap exists."""
    submit = submit or _run_now
    rows, futs = [], []
    for sc in scored:
        row, hp = result_row(prod, batch_id, sc, heatmaps, hm_dir, root)
        if hp is not None:
            futs.append(submit(save_heatmap, hp, sc.item.view, sc.map, prod.thresholds, prod.map_low,
                               peak=sc.score))
        rows.append(row)
    return rows, futs


def settle_heatmaps(rows: list[dict], futs: list[Future]) -> None:
    """Wait for the rows' heatmaps. A heatmap that could not be written (e.g. disk full) is dropped
    from its row: the score is still recorded, without its picture."""
    for f in futs:
        try:
            f.result()
        except Exception:  # noqa: BLE001
            log.exception("heatmap write failed")
    for r in rows:
        if r.get("heatmap_path") and not os.path.isfile(r["heatmap_path"]):
            r["heatmap_path"] = None


# ----------------------------------------------------------------------------------------------
# Summary and progress
# ----------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    batch_id: str
    folder: str
    product: str
    version: str
    out_dir: str
    n_files: int
    n_scored: int
    n_errors: int
    n_skipped: int  # already recorded by an earlier run of the same batch
    n_new: int  # recorded by this run
    counts: dict = field(default_factory=dict)  # verdict -> rows (whole batch)
    csv_path: str | None = None
    html_path: str | None = None
    elapsed_s: float = 0.0
    images_per_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(rows: list[dict], prod, *, batch_id: str, folder: str | os.PathLike, out: Path, n_files: int,
              n_skipped: int, n_new: int, t_start: float, report: bool = True) -> BatchSummary:
    """The summary of a whole batch from its stored ``rows`` (earlier runs included) and, with
    ``report``, its ``results.csv`` and ``report.html`` in ``out``."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    elapsed = time.perf_counter() - t_start
    summary = BatchSummary(
        batch_id=batch_id, folder=str(folder), product=prod.name, version=prod.version, out_dir=str(out),
        n_files=n_files, n_scored=sum(v for k, v in counts.items() if k != ERROR),
        n_errors=counts.get(ERROR, 0), n_skipped=n_skipped, n_new=n_new, counts=counts,
        elapsed_s=round(elapsed, 3), images_per_s=round(n_new / elapsed, 2) if elapsed > 0 else 0.0)
    if report:
        from inspector.batch.report import write_reports

        summary.csv_path, summary.html_path = (str(p) for p in write_reports(rows, out, summary, prod))
    return summary


class BatchProgress:
    """rich progress bar (rate and ETA) on stderr, plus an optional callback(done, total)."""

    def __init__(self, total: int, done: int, enabled: bool, label: str, callback=None):
        self.callback = callback
        self.total, self.done, self.errors = total, done, 0
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} img/s"), TextColumn("errors {task.fields[errors]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=done, rate="-", errors=0)
        self.t0 = time.perf_counter()
        self.n0 = done
        if callback:
            callback(done, total)

    def advance(self, n: int, errors: int = 0) -> None:
        self.done += n
        self.errors += errors
        if self.bar is not None:
            dt = time.perf_counter() - self.t0
            rate = (self.done - self.n0) / dt if dt > 0 else 0.0
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f}", errors=self.errors)
        if self.callback:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


__all__ = ["HEATMAP_MODES", "BatchProgress", "BatchSummary", "Loaded", "Scored", "batch_id_for", "check_heatmaps",
           "decode_file", "display_copy", "error_row", "keep_evidence", "heatmap_dir", "heatmap_file", "iter_files", "load_file",
           "report_dir", "result_row", "score_items", "scored_rows", "settle_heatmaps", "summarize"]
