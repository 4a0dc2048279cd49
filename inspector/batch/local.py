"""Score a folder of images for one product: streamed, batched, resumable, every file recorded.

``run_batch(folder, product, registry, store)``:

* **Streams.** Only the list of file paths is built up front (for the progress total); images
  are read and decoded by a small thread pool a few mini-batches ahead of the model, and each is
  reduced at once to the model's input size (the very resize the single-image path applies, so
  scores are identical) plus a display copy of at most ``heatmap.MAX_SIDE`` pixels for its heatmap.
  Memory holds about ``3 * batch_size`` such pairs, whatever the folder and image sizes.
* **Batches on the device.** Good images are scored ``batch_size`` at a time (one backbone pass).
* **Every file gets a row.** A file that cannot be read (corrupt, empty, not an image, above the
  pixel limit...) is recorded with verdict ``ERROR`` and the :class:`~inspector.io.ImageError`
  reason; the batch goes on. So is every other entry of the walk: link loops, dangling links,
  links to folders (not followed), FIFOs, folders that cannot be listed, and (with ``roots``)
  links leading out of the allowed folders. Names are stored losslessly, whatever their bytes
  (:mod:`inspector.paths`). Hidden files (``.name``) are skipped.
* **Resumable, exactly once.** The batch id is a hash of (folder, product, product version).
  Rows are committed one mini-batch per transaction (after that mini-batch's heatmap PNGs are on
  disk; they are written while the model scores the next mini-batch), and on a rerun every file already recorded
  under that batch id is skipped; the store's unique ``(batch_id, source)`` makes a double row
  impossible even if two runs overlap. Kill it (Ctrl-C, ``kill -9``, power loss) and rerun the
  same command: nothing is scored twice and nothing is lost. A changed product (new version)
  is a new batch.
* **MuSc products** score the folder itself as the mutual set, in subsets of ``musc_subset``
  images (a seeded shuffle of the whole file list, so subsets mix the folder's classes), each
  together with the product's reference shots. Subset membership depends only on the file list,
  so a resumed batch recomputes an interrupted subset identically and records only what is missing.
* **Reports.** At the end, ``results.csv`` and ``report.html`` (score histogram, worst images with
  their heatmaps, errors) in ``out_dir`` cover the whole batch, including rows from earlier runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from inspector import io as imio
from inspector.paths import decode_source
from inspector.products.heatmap import MAX_SIDE, save_heatmap
from inspector.verdict import ERROR

log = logging.getLogger(__name__)

HEATMAP_MODES = ("all", "flagged", "none")


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


@dataclass
class _Loaded:
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


def batch_id_for(folder: str | os.PathLike, product: str, version: str) -> str:
    key = f"{Path(folder).resolve()}\0{product}\0{version}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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


def load_file(path: Path, max_pixels: int | None = None, resize: Callable | None = None,
              roots: tuple[Path, ...] | None = None) -> _Loaded:
    """Read + hash + decode one file; never raises for bad input (returns the reason).
    ``resize``: the model's input resize (``Preprocess.resize``), applied here in the worker.
    ``roots``: the opened file (symlinks resolved) must lie under one of them."""
    try:
        if os.path.islink(path) and os.path.isdir(path):
            raise imio.ImageError(str(path), "a link to a folder (not followed)")
        data = imio.read_file_bytes(path, str(path), roots=roots)
    except imio.ImageError as exc:
        return _Loaded(path, None, None, exc.reason)
    except Exception as exc:  # noqa: BLE001 - one file's problem only
        return _Loaded(path, None, None, f"unreadable ({type(exc).__name__}: {exc})")
    sha = hashlib.sha256(data).hexdigest()
    try:
        rgb = imio.read_image(data, max_pixels=max_pixels, name=str(path))
    except imio.ImageError as exc:
        return _Loaded(path, sha, None, exc.reason)
    except Exception as exc:  # a decoder crash on a hostile file is that file's problem only
        return _Loaded(path, sha, None, f"unreadable image ({type(exc).__name__}: {exc})")
    if resize is None:
        return _Loaded(path, sha, rgb, None, rgb)
    return _Loaded(path, sha, resize(rgb), None, display_copy(rgb))


def _prefetch(pool: ThreadPoolExecutor, paths: list[Path], window: int, max_pixels, resize,
              roots=None) -> Iterator[_Loaded]:
    """Decode ahead in ``pool`` with at most ``window`` files in flight, in order."""
    it = iter(paths)
    pending: deque[Future] = deque()
    for p in it:
        pending.append(pool.submit(load_file, p, max_pixels, resize, roots))
        if len(pending) >= window:
            break
    while pending:
        item = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(load_file, nxt, max_pixels, resize, roots))
        yield item


class _Progress:
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


@dataclass
class Scored:
    item: _Loaded
    score: float
    map: np.ndarray  # at the model's input size, raw score units
    ms: float  # model time per image in its mini-batch


def score_items(registry, prod, items: list[_Loaded], runtime: str = "torch") -> list[Scored]:
    """THE scoring step of every batch engine (local here, Ray in :mod:`inspector.batch.ray`), so
    both give identical scores. A mini-batch that fails as a whole is split to isolate the failing
    file(s): those get ``item.error`` set and are left out of the result."""
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


def run_batch(folder: str | os.PathLike, product, registry, store, out_dir: str | os.PathLike | None = None, *,
              batch_size: int = 8, progress: bool = True, resume: bool = True, runtime: str = "torch",
              heatmaps: str = "all", data_dir: str | os.PathLike | None = None, workers: int | None = None,
              max_pixels: int | None = None, musc_subset: int = 64,
              on_progress: Callable[[int, int], None] | None = None, report: bool = True,
              roots: tuple[str | os.PathLike, ...] | None = None) -> BatchSummary:
    """Score every file under ``folder`` with ``product`` (name or Product); see the module docstring.

    ``heatmaps``: ``all`` (a PNG per scored image), ``flagged`` (UNCERTAIN and NG only) or ``none``.
    ``resume=False`` starts a new batch (new id) instead of continuing the folder's batch.
    ``roots``: confine reads to these folders after symlink resolution (the station passes its
    allowed roots); a file whose link leads elsewhere gets an ERROR row, its content unread.
    """
    t_start = time.perf_counter()
    prod = registry.get(product) if isinstance(product, str) else product
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"batch folder not found or not a directory: {folder}")
    if heatmaps not in HEATMAP_MODES:
        raise ValueError(f"heatmaps must be one of {HEATMAP_MODES}, got {heatmaps!r}")
    batch_size = max(1, int(batch_size))
    data_dir = Path(data_dir) if data_dir else registry.root.parent
    batch_id = batch_id_for(folder, prod.name, prod.version)
    if not resume:
        batch_id = f"{batch_id}-{uuid.uuid4().hex[:8]}"
    out = Path(out_dir) if out_dir else data_dir / "batches" / batch_id
    hm_dir = data_dir / "heatmaps" / "batches" / batch_id
    rt = registry.runtime(prod, runtime)  # fail early (unknown runtime, missing weights)

    files = list(iter_files(folder, exclude=(out, data_dir)))
    done = {decode_source(s) for s in store.batch_sources(batch_id)} if resume else set()
    todo = [p for p in files if str(p) not in done]
    n_skipped = len(files) - len(todo)
    bar = _Progress(len(files), n_skipped, progress, f"{prod.name} {folder.name}", on_progress)
    workers = workers or min(4, os.cpu_count() or 1)
    ctx = _Ctx(prod, registry, store, rt, runtime, batch_id, folder, hm_dir, heatmaps, bar, max_pixels,
               roots=None if roots is None else tuple(Path(r) for r in roots))
    n_new = 0
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="batch-io") as pool:
            ctx.pool = pool
            if rt.mode == "mutual":
                n_new = _run_mutual(ctx, files, done, batch_size, musc_subset)
            else:
                n_new = _run_independent(ctx, todo, batch_size)
    finally:
        bar.close()
    rows = store.history(batch_id=batch_id, limit=None)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    elapsed = time.perf_counter() - t_start
    summary = BatchSummary(
        batch_id=batch_id, folder=str(folder), product=prod.name, version=prod.version, out_dir=str(out),
        n_files=len(files), n_scored=sum(v for k, v in counts.items() if k != ERROR),
        n_errors=counts.get(ERROR, 0), n_skipped=n_skipped, n_new=n_new, counts=counts,
        elapsed_s=round(elapsed, 3), images_per_s=round(n_new / elapsed, 2) if elapsed > 0 else 0.0)
    if report:
        from inspector.batch.report import write_reports

        summary.csv_path, summary.html_path = (str(p) for p in write_reports(rows, out, summary, prod))
    return summary


@dataclass
class _Ctx:
    prod: object
    registry: object
    store: object
    rt: object
    runtime: str
    batch_id: str
    folder: Path
    hm_dir: Path
    heatmaps: str
    bar: _Progress
    max_pixels: int | None
    pool: ThreadPoolExecutor | None = None
    roots: tuple[Path, ...] | None = None

    def error_row(self, item: _Loaded) -> dict:
        return dict(product=self.prod.name, source=str(item.path), image_sha256=item.sha256, score=None,
                    verdict=ERROR, model_version=self.prod.version, batch_id=self.batch_id, error=item.error)

    def heatmap_path(self, path: Path) -> Path:
        return heatmap_file(self.hm_dir, self.folder, path)

    def rows_for(self, scored: list[Scored]) -> tuple[list[dict], list[Future]]:
        """Rows for scored items and the futures of their heatmap PNGs (written in the pool). The
        caller commits the rows only once those futures are done, so a committed row's heatmap
        exists."""
        rows, futs = [], []
        for sc in scored:
            row, hp = result_row(self.prod, self.batch_id, sc, self.heatmaps, self.hm_dir, self.folder)
            if hp is not None:
                futs.append(self.pool.submit(save_heatmap, hp, sc.item.view, sc.map, self.prod.thresholds,
                                             self.prod.map_low, peak=sc.score))
            rows.append(row)
        return rows, futs

    def score_items(self, items: list[_Loaded]) -> tuple[list[dict], list[Future]]:
        scored = score_items(self.registry, self.prod, items, self.runtime)
        ok = {id(sc.item) for sc in scored}
        rows, futs = self.rows_for(scored)
        return [self.error_row(it) for it in items if id(it) not in ok] + rows, futs

    def commit(self, rows: list[dict], futs: list[Future]) -> int:
        """Wait for the rows' heatmaps, then insert the rows in one transaction; advance the bar.
        A heatmap that could not be written is dropped from its row (the score is still recorded)."""
        for f in futs:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - e.g. disk full: the row without its picture
                log.exception("heatmap write failed")
        for r in rows:
            if r.get("heatmap_path") and not os.path.isfile(r["heatmap_path"]):
                r["heatmap_path"] = None
        n = self.store.record_inspections(rows)
        self.bar.advance(len(rows), sum(1 for r in rows if r["verdict"] == ERROR))
        return n


def _run_independent(ctx: _Ctx, todo: list[Path], batch_size: int) -> int:
    """Mini-batches in order; mini-batch k is committed after k+1 is scored, so the heatmap PNGs
    of k are written while the model works on k+1."""
    n_new = 0
    good: list[_Loaded] = []
    errors: list[dict] = []
    pending: tuple[list[dict], list[Future]] | None = None

    def flush():
        nonlocal n_new, good, errors, pending
        rows, futs = ctx.score_items(good) if good else ([], [])
        if pending is not None:
            n_new += ctx.commit(*pending)
        pending = (errors + rows, futs)
        good, errors = [], []

    for item in _prefetch(ctx.pool, todo, 3 * batch_size, ctx.max_pixels, ctx.rt.resize, ctx.roots):
        if item.error is not None:
            errors.append(ctx.error_row(item))
        else:
            good.append(item)
        if len(good) >= batch_size or len(errors) >= batch_size:
            flush()
    if good or errors:
        flush()
    if pending is not None:
        n_new += ctx.commit(*pending)
    return n_new


def _run_mutual(ctx: _Ctx, files: list[Path], done: set[str], batch_size: int, subset: int) -> int:
    """MuSc: the folder is the mutual set, scored in seeded-shuffled subsets of ``subset`` files."""
    import torch

    subset = max(2, int(subset))
    order = np.random.default_rng(int(ctx.batch_id[:8], 16)).permutation(len(files))
    n_new = 0
    for s0 in range(0, len(files), subset):
        members = [files[i] for i in sorted(order[s0:s0 + subset])]
        missing = [p for p in members if str(p) not in done]
        if not missing:
            continue
        rows, good, futs = [], [], []
        for item in _prefetch(ctx.pool, members, 2 * batch_size, ctx.max_pixels, ctx.rt.resize, ctx.roots):
            if item.error is not None:
                if str(item.path) not in done:
                    rows.append(ctx.error_row(item))
            else:
                good.append(item)
        if good:
            t0 = time.perf_counter()
            feats: dict[str, list] = {}
            globs = []
            for b0 in range(0, len(good), batch_size):  # backbone in mini-batches, features kept
                f, g = ctx.rt.extract(ctx.rt.preprocess([it.rgb for it in good[b0:b0 + batch_size]]))
                for k, v in f.items():
                    feats.setdefault(k, []).append(v)
                if g is not None:
                    globs.append(g)
            cat = {k: torch.cat(v) for k, v in feats.items()}
            res = ctx.rt.score_set(cat, torch.cat(globs) if globs else None)
            ms = (time.perf_counter() - t0) * 1e3 / len(good)
            keep = [i for i, it in enumerate(good) if str(it.path) not in done]
            scored, futs = ctx.rows_for([Scored(good[i], float(res.scores[i]), res.maps[i].numpy(), ms) for i in keep])
            rows += scored
        n_new += ctx.commit(rows, futs)
    return n_new


__all__ = ["BatchSummary", "HEATMAP_MODES", "Scored", "batch_id_for", "heatmap_file", "iter_files", "load_file",
           "result_row", "run_batch", "score_items"]
