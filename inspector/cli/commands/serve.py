"""`inspector serve`: start the Gradio inspection station.

Safe defaults: listens on 127.0.0.1:7860 (this machine only); login, upload limit, allowed batch
folders and queue size come from ``--config`` / ``$INSPECTOR_CONFIG`` and the environment (see
:mod:`inspector.station.config`). ``--sample`` builds the bundled sample product ("brick", from
scikit-image's texture; offline, seconds) and registers it (GraphCore on EfficientNet-Lite0 at
256 px, 4 shots) unless it is already registered, and points the Live tab at a replay folder of
its test images: that is what ``make demo`` runs. On a first start the page answers at once and
shows the registration's progress (stage, fold i/n, time left) while it runs in the background.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
import time
from pathlib import Path

SAMPLE_PRODUCT = "brick"
SAMPLE_SHOTS = 4
SAMPLE_SIZE = 256


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the inspection station (web UI)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", action="store_true",
                   help=f"build and register the sample product {SAMPLE_PRODUCT!r} if missing, then serve")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all interfaces)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.add_argument("--data-dir", type=Path, help="data directory (default $INSPECTOR_DATA or ./data)")
    p.add_argument("--config", type=Path, help="station config file (TOML; default $INSPECTOR_CONFIG)")
    p.add_argument("--camera", help="default camera source for the Live tab (index, URL or folder)")
    p.set_defaults(func=run)


def prepare_sample(station, *, backbone: str = "efficientnet-lite0", image_size: int = SAMPLE_SIZE,
                   shots: int = SAMPLE_SHOTS, log=print, register: bool = True) -> tuple[Path, Path]:
    """Build the sample dataset, make a camera replay folder mixing good and defective test images
    and (``register``) register the sample product if it is not registered yet.

    Returns ``(dataset folder, replay folder)``.
    """
    from inspector.data.samples import build_sample

    folder = Path(build_sample(SAMPLE_PRODUCT))
    replay = _replay_folder(station, folder)
    if register:
        register_sample(station, folder, backbone=backbone, image_size=image_size, shots=shots, log=log)
    return folder, replay


def register_sample(station, folder: Path, *, backbone: str = "efficientnet-lite0", image_size: int = SAMPLE_SIZE,
                    shots: int = SAMPLE_SHOTS, log=print, progress=None) -> bool:
    """Register the sample product unless a usable one is registered; True when it registered."""
    from inspector.io import list_images, read_image

    train = list_images(folder / "train" / "good")[:shots]
    replace = False
    if station.registry.exists(SAMPLE_PRODUCT):
        try:  # a product saved by an older, incompatible version of a detector is registered again
            station.registry.get(SAMPLE_PRODUCT).inspect([read_image(train[0])])
        except Exception as exc:  # noqa: BLE001
            log(f"sample product {SAMPLE_PRODUCT!r} cannot be used ({exc}); registering it again")
            replace = True
    if replace or not station.registry.exists(SAMPLE_PRODUCT):
        log(f"registering sample product {SAMPLE_PRODUCT!r} ({len(train)} shots, graphcore, {backbone} "
            f"@ {image_size} px)...")
        station.registry.register(SAMPLE_PRODUCT, [read_image(p) for p in train], detector="graphcore",
                                  backbone=backbone, image_size=image_size, actor="inspector serve --sample",
                                  replace=replace, progress=progress)
        return True
    return False


def _replay_folder(station, folder: Path) -> Path:
    from inspector.io import list_images

    replay = Path(station.data_dir) / "camera-replay" / SAMPLE_PRODUCT
    if not replay.is_dir():
        tmp = replay.with_name(f".{replay.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # interleave good parts and defects, as a line would deliver them
        good = list_images(folder / "test" / "good")
        bad = [p for p in list_images(folder / "test") if p.parent.name != "good"]
        order, gi, bi = [], 0, 0
        while gi < len(good) or bi < len(bad):
            for _ in range(2):
                if gi < len(good):
                    order.append(good[gi])
                    gi += 1
            if bi < len(bad):
                order.append(bad[bi])
                bi += 1
        for i, src in enumerate(order):
            shutil.copy2(src, tmp / f"{i:03d}_{src.parent.name}_{src.name}")
        tmp.rename(replay)
    return replay


def _register_in_background(station, folder: Path, status) -> threading.Thread:
    """First start: register the sample product in a thread while the page already answers; the
    page's banner shows ``status`` (stage, fold i/n, time left)."""
    from app.station import StageProgress

    def work():
        t0 = time.perf_counter()
        def sink(frac: float, desc: str) -> None:
            status.update(f"First start: registering the sample product {SAMPLE_PRODUCT!r} (fit + calibration "
                          f"on {SAMPLE_SHOTS} shots) — {desc}", frac)
            print(f"sample registration {100 * frac:3.0f}%: {desc}", flush=True)

        stages = StageProgress(sink)
        try:
            done = register_sample(station, folder, progress=stages,
                                   log=lambda m: status.update(f"First start: {m}", 0.0))
            secs = time.perf_counter() - t0
            status.update(f"Sample product {SAMPLE_PRODUCT!r} registered in {secs:.0f} s." if done else "", 1.0,
                          state="done")
            print(f"sample product ready after {secs:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - shown on the page, the station still serves
            logging.getLogger("inspector.serve").exception("sample registration failed")
            status.update(f"Registering the sample product failed: {type(exc).__name__}: {exc}", state="failed")

    th = threading.Thread(target=work, name="sample-registration", daemon=True)
    th.start()
    return th


def run(args: argparse.Namespace) -> int:
    from inspector.station.config import StationConfig
    from inspector.station.service import Station

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = StationConfig.load(args.config, host=args.host, port=args.port, data_dir=args.data_dir,
                             camera=args.camera)
    station = Station(cfg.data_dir)
    cfg.data_dir = Path(station.data_dir)
    from app.station import StartupStatus, StationApp

    startup = StartupStatus()
    if args.sample:
        folder, replay = prepare_sample(station, register=False)
        if not cfg.camera:
            cfg.camera = str(replay)
        cfg.allowed_batch_roots = [*cfg.allowed_batch_roots, folder]
        startup.update(f"Checking the sample product {SAMPLE_PRODUCT!r}…" if station.registry.exists(SAMPLE_PRODUCT)
                       else f"First start: registering the sample product {SAMPLE_PRODUCT!r}…", 0.0)
        _register_in_background(station, folder, startup)
    app = StationApp(station, cfg, startup=startup)
    for w in cfg.warnings():
        print(f"warning: {w}")
    line = _start_line(station, cfg)  # [line] enabled = true: camera -> verdicts to the PLC, next to the UI
    print(f"inspection station on http://{cfg.host}:{cfg.port}  (data: {station.data_dir}; Ctrl-C stops)")
    try:
        app.launch()
    finally:
        if line is not None:
            line.stop()
    return 0


def _start_line(station, cfg):
    if not cfg.line:
        return None
    from inspector.line.config import LineConfig

    lc = LineConfig.from_dict(cfg.line)
    if not lc.enabled:
        return None
    from inspector.line.runner import LineStation

    line = LineStation(station, lc).start()
    for msg in line.describe():
        print(msg)
    return line
