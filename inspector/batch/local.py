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
* **Evidence.** With ``evidence`` (the station passes its evidence store), every file that
  decodes is kept there as it is loaded, before its row commits (:mod:`inspector.batch.common`).
* **Reports.** At the end, ``results.csv`` and ``report.html`` (score histogram, worst images with
  their heatmaps, errors) in ``out_dir`` cover the whole batch, including rows from earlier runs.

What this engine shares with the Ray engine (loading, rows, scoring step, heatmaps, summary) is in
:mod:`inspector.batch.common`; this module is the threads and the mini-batch order.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspector.batch.common import (
    BatchProgress,
    BatchSummary,
    Loaded,
    Scored,
    batch_id_for,
    check_heatmaps,
    error_row,
    heatmap_dir,
    iter_files,
    load_file,
    report_dir,
    score_items,
    scored_rows,
    settle_heatmaps,
    summarize,
)
from inspector.paths import decode_source
from inspector.verdict import ERROR


def _prefetch(pool: ThreadPoolExecutor, paths: list[Path], window: int, max_pixels, resize,
              roots=None, evidence=None) -> Iterator[Loaded]:
    """Decode ahead in ``pool`` with at most ``window`` files in flight, in order."""
    it = iter(paths)
    pending: deque[Future] = deque()
    for p in it:
        pending.append(pool.submit(load_file, p, max_pixels, resize, roots, evidence))
        if len(pending) >= window:
            break
    while pending:
        item = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(load_file, nxt, max_pixels, resize, roots, evidence))
        yield item


def run_batch(folder: str | os.PathLike, product, registry, store, out_dir: str | os.PathLike | None = None, *,
              batch_size: int = 8, progress: bool = True, resume: bool = True, runtime: str = "torch",
              heatmaps: str = "all", data_dir: str | os.PathLike | None = None, workers: int | None = None,
              max_pixels: int | None = None, musc_subset: int = 64,
              on_progress: Callable[[int, int], None] | None = None, report: bool = True,
              roots: tuple[str | os.PathLike, ...] | None = None,
              on_recorded: Callable[[list[dict]], None] | None = None, evidence=None) -> BatchSummary:
    """Score every file under ``folder`` with ``product`` (name or Product); see the module docstring.

    ``heatmaps``: ``all`` (a PNG per scored image), ``flagged`` (UNCERTAIN and NG only) or ``none``.
    ``resume=False`` starts a new batch (new id) instead of continuing the folder's batch.
    ``roots``: confine reads to these folders after symlink resolution (the station passes its
    allowed roots); a file whose link leads elsewhere gets an ERROR row, its content unread.
    ``on_recorded(rows)``: called with each mini-batch's rows once they are committed (the
    station's shadow mode hands them to its worker there; it must not block).
    ``evidence``: an :class:`~inspector.products.feedback.images.EvidenceImages` that keeps every
    file that decodes (the station passes its own); None keeps nothing.
    """
    t_start = time.perf_counter()
    prod = registry.get(product) if isinstance(product, str) else product
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"batch folder not found or not a directory: {folder}")
    check_heatmaps(heatmaps)
    batch_size = max(1, int(batch_size))
    data_dir = Path(data_dir) if data_dir else registry.root.parent
    batch_id = batch_id_for(folder, prod.name, prod.version, resume=resume)
    out = report_dir(data_dir, batch_id, out_dir)
    rt = registry.runtime(prod, runtime)  # fail early (unknown runtime, missing weights)

    files = list(iter_files(folder, exclude=(out, data_dir)))
    done = {decode_source(s) for s in store.batch_sources(batch_id)} if resume else set()
    todo = [p for p in files if str(p) not in done]
    n_skipped = len(files) - len(todo)
    bar = BatchProgress(len(files), n_skipped, progress, f"{prod.name} {folder.name}", on_progress)
    workers = workers or min(4, os.cpu_count() or 1)
    ctx = _Ctx(prod, registry, store, rt, runtime, batch_id, folder, heatmap_dir(data_dir, batch_id), heatmaps,
               bar, max_pixels, roots=None if roots is None else tuple(Path(r) for r in roots),
               on_recorded=on_recorded, evidence=evidence)
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
    return summarize(store.history(batch_id=batch_id, limit=None), prod, batch_id=batch_id, folder=folder, out=out,
                     n_files=len(files), n_skipped=n_skipped, n_new=n_new, t_start=t_start, report=report)


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
    bar: BatchProgress
    max_pixels: int | None
    pool: ThreadPoolExecutor | None = None
    roots: tuple[Path, ...] | None = None
    on_recorded: Callable[[list[dict]], None] | None = None
    evidence: object | None = None

    def error_row(self, item: Loaded) -> dict:
        return error_row(self.prod.name, self.prod.version, str(item.path), item.error, image_sha256=item.sha256,
                         batch_id=self.batch_id)

    def rows_for(self, scored: list[Scored]) -> tuple[list[dict], list[Future]]:
        """Rows for scored items and the futures of their heatmap PNGs (written in the pool)."""
        return scored_rows(self.prod, self.batch_id, scored, self.heatmaps, self.hm_dir, self.folder,
                           submit=self.pool.submit)

    def score_items(self, items: list[Loaded]) -> tuple[list[dict], list[Future]]:
        scored = score_items(self.registry, self.prod, items, self.runtime)
        ok = {id(sc.item) for sc in scored}
        rows, futs = self.rows_for(scored)
        return [self.error_row(it) for it in items if id(it) not in ok] + rows, futs

    def commit(self, rows: list[dict], futs: list[Future]) -> int:
        """Wait for the rows' heatmaps, then insert the rows in one transaction; advance the bar."""
        settle_heatmaps(rows, futs)
        n = self.store.record_inspections(rows)
        if self.on_recorded is not None and rows:
            self.on_recorded(rows)
        self.bar.advance(len(rows), sum(1 for r in rows if r["verdict"] == ERROR))
        return n


def _run_independent(ctx: _Ctx, todo: list[Path], batch_size: int) -> int:
    """Mini-batches in order; mini-batch k is committed after k+1 is scored, so the heatmap PNGs
    of k are written while the model works on k+1."""
    n_new = 0
    good: list[Loaded] = []
    errors: list[dict] = []
    pending: tuple[list[dict], list[Future]] | None = None

    def flush():
        nonlocal n_new, good, errors, pending
        rows, futs = ctx.score_items(good) if good else ([], [])
        if pending is not None:
            n_new += ctx.commit(*pending)
        pending = (errors + rows, futs)
        good, errors = [], []

    for item in _prefetch(ctx.pool, todo, 3 * batch_size, ctx.max_pixels, ctx.rt.resize, ctx.roots, ctx.evidence):
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
        for item in _prefetch(ctx.pool, members, 2 * batch_size, ctx.max_pixels, ctx.rt.resize, ctx.roots, ctx.evidence):
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


__all__ = ["run_batch"]
