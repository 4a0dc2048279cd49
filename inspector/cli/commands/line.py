"""`inspector line`: put a station on a production line.

``inspector line discover`` lists the GenICam cameras visible from this machine.
``inspector line run`` runs the line headless: camera -> trigger -> inspection -> verdict, with the
OPC UA server, the Modbus reject gate and ``/metrics`` + ``/health`` as configured in the
``[line]`` tables of the station config (``deploy/station.example.toml``). ``inspector serve``
runs the same line next to the web UI when ``[line] enabled = true``.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

from inspector.cli.commands._common import add_data_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("line", help="production line: GenICam cameras, triggers, verdicts to the PLC",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = p.add_subparsers(dest="line_cmd", required=True)
    d = lsub.add_parser("discover", help="list the GenICam cameras visible from here")
    d.set_defaults(func=discover)
    r = lsub.add_parser("run", help="run the line (no web UI) until Ctrl-C / SIGTERM")
    r.add_argument("--config", type=Path, help="station config file (TOML; default $INSPECTOR_CONFIG)")
    r.add_argument("--product", help="active product (overrides [line] product)")
    r.add_argument("--source", help="camera (overrides [line] source), e.g. genicam://Aravis-Fake-GV01")
    r.add_argument("--trigger-every", type=float, metavar="S",
                   help="send a software trigger every S seconds (a stand-in for the PLC on a first run)")
    add_data_dir(r, nested=True)
    r.set_defaults(func=run)


def discover(args: argparse.Namespace) -> int:
    from inspector.cameras.genicam import GenICamUnavailable
    from inspector.cameras.genicam import discover as find
    from inspector.errors import CommandError

    try:
        cams = find()
    except GenICamUnavailable as exc:
        raise CommandError(str(exc)) from exc
    if not cams:
        print("no GenICam camera found (GigE Vision: same subnet? firewall open for UDP 3956?)")
        return 1
    for c in cams:
        print(f"genicam://{c['id']}\t{c['protocol']}\t{c['address']}\t{c['vendor']} {c['model']} (serial {c['serial']})")
    return 0


def line_config(cfg, product: str | None = None, source: str | None = None):
    """The LineConfig of a StationConfig, with command-line overrides."""
    from inspector.line.config import LineConfig

    lc = LineConfig.from_dict(cfg.line)
    if product:
        lc.product = product
    if source:
        lc.source = source
    return lc


def run(args: argparse.Namespace) -> int:
    import logging

    from inspector.errors import CommandError
    from inspector.line.runner import LineStation
    from inspector.station.config import StationConfig
    from inspector.station.service import StationService

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("asyncua", "pymodbus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = StationConfig.load(args.config, data_dir=getattr(args, "data_dir", None))
    lc = line_config(cfg, args.product, args.source)
    if not lc.product:
        raise CommandError("no product: set [line] product in the config or pass --product")
    station = StationService(cfg.data_dir, evidence_max_gb=cfg.evidence_max_gb)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LineStation(station, lc) as line:
        for msg in line.describe():
            print(msg, flush=True)
        every = args.trigger_every or 1.0
        last_report, n = time.monotonic(), 0
        while not stop.wait(every):
            if args.trigger_every:
                line.pipeline.trigger()
            if time.monotonic() - last_report >= 10.0:  # a line in the journal every 10 s
                st = line.pipeline.status()
                last = st["last"] or {}
                print(f"line: ready={st['ready']} camera={st['camera']['state']} counts={st['counts']} "
                      f"last={last.get('verdict')} frame={last.get('frame_id')}", flush=True)
                last_report, n = time.monotonic(), n + 1
    return 0
