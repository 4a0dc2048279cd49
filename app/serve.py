"""`inspector serve`: start the Gradio inspection station.

Safe defaults: listens on 127.0.0.1:7860 (this machine only); login, upload limit, allowed batch
folders and queue size come from ``--config`` / ``$INSPECTOR_CONFIG`` and the environment (see
:mod:`inspector.station.config`). ``--sample`` builds the bundled sample product ("brick", from
scikit-image's texture; offline, seconds) and registers it (GraphCore on EfficientNet-Lite0 at
256 px, 4 shots) unless it is already registered, and points the Live tab at a replay folder of
its test images: that is what ``make demo`` runs. On a first start the page answers at once and
shows the registration's progress (stage, fold i/n, time left) while it runs in the background.
"""

# The command joins `inspector`'s command line through the entry point `inspector.commands` in
# pyproject.toml (the library never imports app/); importing this module must stay cheap, since
# every `inspector` command builds the whole parser: Gradio is imported only when serving.

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from inspector.station.sample import SAMPLE_PRODUCT


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


def run(args: argparse.Namespace) -> int:
    from inspector.products.progress import StartupStatus
    from inspector.station.config import StationConfig
    from inspector.station.sample import prepare_sample, register_in_background
    from inspector.station.service import StationService

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = StationConfig.load(args.config, host=args.host, port=args.port, data_dir=args.data_dir,
                             camera=args.camera)
    station = StationService(cfg.data_dir, evidence_max_gb=cfg.evidence_max_gb)
    cfg.data_dir = Path(station.data_dir)
    from app.shell import StationApp

    startup = StartupStatus()
    if args.sample:
        folder, replay = prepare_sample(station, register=False)
        if not cfg.camera:
            cfg.camera = str(replay)
        cfg.allowed_batch_roots = [*cfg.allowed_batch_roots, folder]
        startup.update(f"Checking the sample product {SAMPLE_PRODUCT!r}…" if station.registry.exists(SAMPLE_PRODUCT)
                       else f"First start: registering the sample product {SAMPLE_PRODUCT!r}…", 0.0)
        register_in_background(station, folder, startup)
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
