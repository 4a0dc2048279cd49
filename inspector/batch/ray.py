"""The same batch as :mod:`inspector.batch.local`, spread over a Ray cluster with Ray Data.

``run_batch_ray(source, product, registry, store, address=..., workers=N)``. Pipeline (streaming,
so memory stays bounded whatever the number of files)::

    file list -> minus files already recorded -> decode tasks -> scoring actor pool -> Parquet
                                                                       |
                                                                       +-> store upsert (commit point)

* **File list.** A folder (walked exactly like the local engine, same batch id, so the two engines
  resume each other's batches), a glob (``'/nas/line*/2026-11-*/*.png'``) or a manifest: a CSV or
  Parquet file with a ``path`` (or ``uri``) column, read by Ray Data; relative paths are relative
  to the manifest. ``file://`` URIs are local paths; other URIs (``s3://``...) are read through
  pyarrow's filesystems.
* **Decode tasks** (``num_cpus`` a quarter CPU each) read, hash (sha256) and decode each file and
  resize it to the model's input size (the same ``Preprocess.resize`` as every other path) plus a
  display copy for its heatmap. A bad file becomes an error row here, like the local engine's.
  A file that decodes is kept in the evidence store here, before its row exists (the driver's
  ``evidence`` store: each task process opens its folder, ``<data dir>/evidence`` on the shared
  filesystem, with the driver's budget, as the station does).
* **Scoring actors** (``workers`` of them; ``gpus_per_worker`` GPUs each when the cluster has GPUs)
  open the product registry and the store themselves (the registry under the data directory, the
  store at the driver's URL, with the driver's store class: this module knows no station), load
  the product's model once, score each mini-batch with :func:`inspector.batch.common.score_items`
  (the local engine's scoring step, hence identical scores), write the heatmap PNGs, then upsert
  the mini-batch's rows in one transaction (the store's ``upsert_batch_results``).
* **Exactly once.** A result is keyed by (batch id, path, sha256) and written by an idempotent
  upsert after its heatmap exists. A killed actor is restarted by Ray and its mini-batch retried:
  rows it had already committed are not written twice. A killed driver loses nothing committed;
  rerunning the same command skips every file already recorded and finishes the rest.
* **Parquet results.** Each run's rows are written by Ray Data to ``<out>/results/.run-<id>`` and
  the folder is renamed to ``run-<id>`` only when the run finishes, so a killed run leaves no
  half-written files in the dataset. At the end, rows the store has but the dataset lacks (those
  committed by a killed run) are written as one more ``fill-<id>`` part: after every finished run
  ``<out>/results`` holds each file of the batch exactly once.
* **Cluster.** Actors open the store themselves: a multi-node cluster needs a shared database
  (``INSPECTOR_DB_URL=postgresql+psycopg://...``) and the data directory (products, heatmaps) on
  a shared filesystem, with the same inspector installed on every node.
* **Driver.** A progress bar (images/s, ETA) from the store's row count, then the same
  ``results.csv`` / ``report.html`` as the local engine.

MuSc products score a folder as a mutual set (subsets of the folder); that needs every member of a
subset on one worker and stays on the local engine for now (clear error here).
"""

from __future__ import annotations

import glob as globmod
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from inspector import io as imio
from inspector.batch import common
from inspector.eval.measure import peak_rss_mib
from inspector.paths import decode_source, encode_source
from inspector.verdict import ERROR

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMNS = ("path", "uri", "file", "source")
#: columns of the Parquet results dataset (the store's row plus which worker scored it)
RESULT_COLUMNS = {"source": "string", "image_sha256": "string", "score": "float64", "verdict": "string",
                  "error": "string", "heatmap_path": "string", "latency_ms": "float64", "model_version": "string",
                  "batch_id": "string", "product": "string", "worker": "string", "worker_peak_rss_mib": "float64"}
DECODE_CPUS = 0.25
ROWS_PER_FILE = 100_000


class RayUnavailable(RuntimeError):
    """The batch cannot run on Ray as asked (unsupported product, no cluster at the address...)."""


# ----------------------------------------------------------------------------------------------
# Sources: folder, glob or manifest -> (batch root, batch key, file list as a Ray dataset)
# ----------------------------------------------------------------------------------------------
def is_manifest(source: str | os.PathLike) -> bool:
    return Path(source).suffix.lower() in MANIFEST_SUFFIXES and Path(source).is_file()


def is_glob(source: str | os.PathLike) -> bool:
    return any(c in str(source) for c in "*?[") and not Path(source).exists()


def _norm(p: str, base: Path) -> str:
    """A manifest entry as the key stored for it: absolute local path, or the URI as given."""
    if p.startswith("file://"):
        p = p[len("file://"):]
    elif "://" in p:
        return p
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else Path(os.path.abspath(base / path)))


def _manifest_paths(batch, column: str, base: str):
    import pyarrow as pa

    b = Path(base)
    return pa.table({"path": pa.array([encode_source(_norm(str(p), b)) for p in batch.column(column).to_pylist()
                                       if p is not None and str(p).strip()], pa.string())})


def read_file_list(source: str | os.PathLike, exclude: tuple[Path, ...] = ()):
    """``(root, key, dataset of {"path"})`` for a folder, a glob or a CSV/Parquet manifest."""
    import ray.data

    src = str(source)
    if is_manifest(src):
        man = Path(src).resolve()
        ds = ray.data.read_csv(str(man)) if man.suffix.lower() == ".csv" else ray.data.read_parquet(str(man))
        cols = ds.columns()
        col = next((c for c in PATH_COLUMNS if c in cols), cols[0] if len(cols) == 1 else None)
        if col is None:
            raise ValueError(f"manifest {man} has no path column (one of {', '.join(PATH_COLUMNS)}); columns: {cols}")
        ds = ds.map_batches(_manifest_paths, batch_format="pyarrow", fn_kwargs={"column": col, "base": str(man.parent)},
                            num_cpus=DECODE_CPUS)
        return man.parent, str(man), ds
    if is_glob(src):
        pattern = os.path.abspath(os.path.expanduser(src))
        files = sorted(p for p in globmod.glob(pattern, recursive=True) if not os.path.isdir(p))
        root = Path(os.path.commonpath(files)).parent if files else Path(pattern).parent
        return root, pattern, _path_table(files)
    folder = Path(src).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"batch source not found: {src} (a folder, a glob or a .csv/.parquet manifest)")
    return folder, str(folder), _path_table(str(p) for p in common.iter_files(folder, exclude=exclude))


def _path_table(paths):
    """The file list as a Ray dataset of stored sources (:func:`inspector.paths.encode_source`:
    any file name, non-UTF-8 too, is valid Arrow text and compares with the store's rows)."""
    import pyarrow as pa
    import ray.data

    return ray.data.from_arrow(pa.table({"path": pa.array([encode_source(p) for p in paths], pa.string())}))


def _drop_done(batch, done):
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.is_in(batch.column("path"), value_set=done)))


# ----------------------------------------------------------------------------------------------
# Decode tasks
# ----------------------------------------------------------------------------------------------
def _load_uri(uri: str, max_pixels, resize, evidence=None) -> common.Loaded:
    """``load_file`` for a non-local URI (read through pyarrow's filesystems)."""
    import pyarrow.fs as pafs

    try:
        fs, p = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(p)
        if info.size is not None and info.size > imio.MAX_BYTES:
            return common.Loaded(Path(p), None, None, f"file too large ({info.size} bytes > {imio.MAX_BYTES})")
        with fs.open_input_stream(p) as f:
            data = f.read()
    except Exception as exc:
        return common.Loaded(Path(uri), None, None, f"unreadable: {exc}")
    return common.decode_file(Path(uri), data, uri, max_pixels, resize, evidence)


_EVIDENCE: dict[tuple[str, int], object] = {}


def _evidence_store(spec: tuple[str, int] | None):
    """The evidence store a decode task keeps its files in, opened once per worker process."""
    if spec is None:
        return None
    key = (str(spec[0]), int(spec[1]))
    if key not in _EVIDENCE:
        from inspector.products.feedback.images import EvidenceImages

        _EVIDENCE[key] = EvidenceImages(*key)
    return _EVIDENCE[key]


def decode_batch(batch: dict, size: int, max_pixels: int | None, views: bool, roots: tuple[str, ...] | None = None,
                 evidence: tuple[str, int] | None = None) -> dict:
    """Ray Data task: ``{"path"}`` -> path, sha256, error, image (model input), view (display copy).
    ``roots``: reads confined to these folders (as the local engine's ``roots``). ``evidence``:
    ``(folder, max_bytes)`` of the evidence store that keeps each file that decodes."""
    from inspector.backbones.base import Preprocess

    resize = Preprocess(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).resize
    paths = [str(p) for p in batch["path"]]
    confine = None if roots is None else tuple(Path(r) for r in roots)
    ev = _evidence_store(evidence)
    items = [_load_uri(p, max_pixels, resize, ev) if "://" in p
             else common.load_file(Path(decode_source(p)), max_pixels, resize, confine, ev) for p in paths]
    blank = np.zeros((size, size, 3), np.uint8)
    no_view = np.zeros((1, 1, 3), np.uint8)
    return {
        "path": np.array(paths, dtype=object),
        "sha256": np.array([it.sha256 or "" for it in items], dtype=object),
        "error": np.array([it.error or "" for it in items], dtype=object),
        "image": np.stack([blank if it.rgb is None else it.rgb for it in items]),
        "view": np.array([it.view if (views and it.view is not None) else no_view for it in items] + [None],
                         dtype=object)[:-1],
    }


def results_table(rows: list[dict], worker: str | None = None, peak_rss_mib: float | None = None,
                  encode: bool = False):
    """Rows as a pyarrow table with the fixed :data:`RESULT_COLUMNS` schema (every Parquet part of
    a batch has the same schema, whatever its nulls). ``encode``: paths as the store keeps them
    (rows read back from the store already are)."""
    import pyarrow as pa

    extra = {"worker": worker, "worker_peak_rss_mib": peak_rss_mib}
    schema = pa.schema([(c, pa.type_for_alias(t)) for c, t in RESULT_COLUMNS.items()])
    cols = {c: [r.get(c, extra.get(c)) for r in rows] for c in RESULT_COLUMNS}
    if encode:
        for c in ("source", "heatmap_path"):
            cols[c] = [None if v is None else encode_source(str(v)) for v in cols[c]]
    return pa.table(cols, schema=schema)


# ----------------------------------------------------------------------------------------------
# Scoring actors
# ----------------------------------------------------------------------------------------------
class Scorer:
    """Ray Data actor: one product model per actor, loaded once; see the module docstring."""

    def __init__(self, data_dir: str, store_url: str, product: str, version: str, runtime: str, device: str,
                 batch_id: str, root: str, heatmaps: str, threads: int = 0, *, store_cls: type):
        """``store_cls``: the driver's store class, opened here at ``store_url`` (the same database);
        the registry is ``<data_dir>/products`` with that store, as the station's."""
        import socket

        import torch

        from inspector.products.registry import ProductRegistry

        if threads:
            torch.set_num_threads(threads)
        self.store = store_cls(store_url)
        self.registry = ProductRegistry(Path(data_dir) / "products", store=self.store, device=device)
        self.prod = self.registry.get(product)
        if self.prod.version != version:
            raise RayUnavailable(f"product {product} changed during the batch ({version} -> {self.prod.version})")
        self.registry.runtime(self.prod, runtime)  # the model, loaded once per actor
        self.runtime, self.batch_id, self.root, self.heatmaps = runtime, batch_id, Path(root), heatmaps
        self.hm_dir = common.heatmap_dir(data_dir, batch_id)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        items = [common.Loaded(Path(decode_source(str(p))), sha or None, img if not err else None, err or None, view)
                 for p, sha, err, img, view in zip(batch["path"], batch["sha256"], batch["error"], batch["image"],
                                                    batch["view"])]
        prod = self.prod
        good = [it for it in items if it.error is None]
        scored = common.score_items(self.registry, prod, good, self.runtime) if good else []
        ok = {id(sc.item) for sc in scored}
        rows = [common.error_row(prod.name, prod.version, decode_source(str(p)), it.error, image_sha256=it.sha256,
                          batch_id=self.batch_id)
                for p, it in zip(batch["path"], items) if id(it) not in ok]
        good_rows, futs = common.scored_rows(prod, self.batch_id, scored, self.heatmaps, self.hm_dir, self.root)
        common.settle_heatmaps(good_rows, futs)  # written here, in the actor
        rows += good_rows
        self.store.upsert_batch_results(rows)  # commit point: after the heatmaps exist
        return results_table(rows, self.worker, peak_rss_mib(), encode=True)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def connect(address: str | None = None, **init_kwargs) -> None:
    """Join the cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``) or start a
    local Ray instance (``address=None``); a process already connected keeps its connection."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, **init_kwargs)
    except ConnectionError as exc:
        raise RayUnavailable(f"no Ray cluster at {address!r}: {exc}") from exc


def _plan_resources(workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None):
    """``(workers, gpus per worker, cpus per worker)``: GPU actors when the cluster has GPUs; CPU
    actors otherwise, leaving at least half a CPU for decode tasks."""
    import ray

    res = ray.cluster_resources()
    n_gpu, n_cpu = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if n_gpu >= 1 else 0.0
    if gpus_per_worker > 0 and n_gpu <= 0:
        raise RayUnavailable(f"--gpus-per-worker {gpus_per_worker} but the cluster has no GPU")
    if workers is None:
        workers = max(1, int(n_gpu // gpus_per_worker)) if gpus_per_worker > 0 else max(1, int(n_cpu) - 1)
    workers = max(1, int(workers))
    if cpus_per_worker is None:
        cpus_per_worker = min(1.0, max(0.1, (n_cpu - 0.5) / workers))
    return workers, float(gpus_per_worker), float(cpus_per_worker)


def _results_keys(results_dir: Path) -> set[str]:
    import pyarrow.dataset as pads

    if not results_dir.is_dir() or not any(p.is_dir() and not p.name.startswith(".") for p in results_dir.iterdir()):
        return set()
    return set(pads.dataset(str(results_dir), format="parquet").to_table(columns=["source"]).column("source")
               .to_pylist())


def _write_parquet(ds, results_dir: Path, name: str) -> None:
    """Ray Data writes into a hidden folder, renamed into the dataset only once complete."""
    import shutil

    tmp = results_dir / f".{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    # few files and write tasks (not one per mini-batch: each new task may be a new worker process)
    ds.write_parquet(str(tmp), min_rows_per_file=ROWS_PER_FILE,
                     ray_remote_args={"num_cpus": DECODE_CPUS})
    if tmp.is_dir() and any(tmp.iterdir()):
        os.replace(tmp, results_dir / name)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _fill_results(rows: list[dict], results_dir: Path, run_id: str) -> int:
    """Write the store's rows missing from the Parquet dataset (committed by a killed run)."""
    import ray.data

    have = _results_keys(results_dir)
    missing = [r for r in rows if r["source"] not in have]
    if not missing:
        return 0
    _write_parquet(ray.data.from_arrow(results_table(missing)), results_dir, f"fill-{run_id}")
    return len(missing)


class _StorePoller:
    """Advances the progress bar from the store's row count (what is committed is what is done)."""

    def __init__(self, store, batch_id: str, bar: common.BatchProgress, start: int, start_errors: int, every: float = 0.5):
        self.store, self.batch_id, self.bar, self.every = store, batch_id, bar, every
        self.n, self.err = start, start_errors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-batch-progress", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        n = self.store.count(batch_id=self.batch_id)
        err = self.store.count(batch_id=self.batch_id, verdict=ERROR)
        if n > self.n:
            self.bar.advance(n - self.n, max(0, err - self.err))
            self.n, self.err = n, err

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll()
            except Exception:  # a busy database delays the bar, never the batch
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


def _evidence_spec(evidence) -> tuple[str, int] | None:
    """What a decode task needs to open the driver's evidence store: its folder and budget."""
    if evidence is None or not evidence.enabled:
        return None
    return str(Path(evidence.root).resolve()), int(evidence.max_bytes)


def run_batch_ray(source: str | os.PathLike, product, registry, store, out_dir: str | os.PathLike | None = None, *,
                  address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
                  cpus_per_worker: float | None = None, batch_size: int = 8, progress: bool = True,
                  resume: bool = True, runtime: str = "torch", heatmaps: str = "all",
                  data_dir: str | os.PathLike | None = None, max_pixels: int | None = None,
                  on_progress=None, report: bool = True, init_kwargs: dict | None = None,
                  roots: tuple[str | os.PathLike, ...] | None = None, evidence=None) -> common.BatchSummary:
    """Score every file of ``source`` (folder, glob or manifest) on Ray; see the module docstring.
    Arguments as :func:`inspector.batch.local.run_batch`, plus the cluster ``address`` (None: a local
    Ray instance), the number of scoring actors ``workers`` and their GPU/CPU shares."""
    import pyarrow as pa
    import ray.data

    t_start = time.perf_counter()
    prod = registry.get(product) if isinstance(product, str) else product
    common.check_heatmaps(heatmaps)
    if registry.runtime(prod, runtime).mode == "mutual":  # loads here: unknown runtime, missing weights fail early
        raise RayUnavailable(f"{prod.name} is a {prod.detector} product: it scores a folder as a mutual set, "
                             "which runs on the local engine (--engine local)")
    batch_size = max(1, int(batch_size))
    data_dir = Path(data_dir) if data_dir else registry.root.parent
    if max_pixels is None:  # the driver's limit, not each node's environment
        max_pixels = imio.MAX_PIXELS
    connect(address, **(init_kwargs or {}))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    src = str(source)
    if not (is_manifest(src) or is_glob(src)) and not Path(src).is_dir():
        raise FileNotFoundError(f"batch source not found: {src} (a folder, a glob or a .csv/.parquet manifest)")
    key = str(Path(src).resolve()) if not is_glob(src) else os.path.abspath(os.path.expanduser(src))
    batch_id = common.batch_id_for(key, prod.name, prod.version, resume=resume)
    out = common.report_dir(data_dir, batch_id, out_dir)
    root, _, files = read_file_list(src, exclude=(out, data_dir))
    files = files.materialize()
    n_files = files.count()
    done = store.batch_sources(batch_id) if resume else set()
    todo = files.map_batches(_drop_done, batch_format="pyarrow", fn_kwargs={"done": pa.array(sorted(done), pa.string())},
                             num_cpus=DECODE_CPUS).materialize() if done else files
    n_todo = todo.count()
    n_skipped = n_files - n_todo
    if n_todo:  # blocks of about one mini-batch (decode parallelism), cut now, before actors hold CPUs
        todo = todo.repartition(max(1, min(-(-n_todo // batch_size), 1024))).materialize()
    n_before, err_before = store.count(batch_id=batch_id), store.count(batch_id=batch_id, verdict=ERROR)

    n_workers, gpus, cpus = _plan_resources(workers, gpus_per_worker, cpus_per_worker)
    device = "cuda" if gpus > 0 else "cpu"
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    bar = common.BatchProgress(n_files, n_skipped, progress, f"{prod.name} {Path(key).name} (ray x{n_workers})", on_progress)
    poller = _StorePoller(store, batch_id, bar, n_before, err_before)
    try:
        if n_todo:
            scored = (todo.map_batches(decode_batch, batch_size=batch_size, num_cpus=DECODE_CPUS,
                                   fn_kwargs={"size": prod.image_size, "max_pixels": max_pixels,
                                              "views": heatmaps != "none",
                                              "roots": None if roots is None else tuple(str(r) for r in roots),
                                              "evidence": _evidence_spec(evidence)})
                      .map_batches(Scorer, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=n_workers),
                                   num_cpus=cpus, num_gpus=gpus or None,
                                   fn_constructor_kwargs=dict(
                                       data_dir=str(Path(data_dir).resolve()), store_url=store.url, product=prod.name,
                                       version=prod.version, runtime=runtime, device=device, batch_id=batch_id,
                                       root=str(root), heatmaps=heatmaps, threads=max(1, int(cpus)),
                                       store_cls=type(store))))
            _write_parquet(scored, results_dir, f"run-{run_id}")
    finally:
        poller.stop()
        bar.close()
    rows = store.history(batch_id=batch_id, limit=None)
    _fill_results(rows, results_dir, run_id)
    return common.summarize(rows, prod, batch_id=batch_id, folder=root, out=out, n_files=n_files, n_skipped=n_skipped,
                     n_new=len(rows) - n_before, t_start=t_start, report=report)


__all__ = ["RESULT_COLUMNS", "RayUnavailable", "Scorer", "connect", "decode_batch", "read_file_list",
           "run_batch_ray"]
