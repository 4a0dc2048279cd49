"""The bundled sample product on a station: what ``inspector serve --sample`` (``make demo``) sets up.

The sample dataset ("brick", from scikit-image's texture; offline, seconds) comes from
:func:`inspector.synth.samples.build_sample`. Here it becomes a registered product (GraphCore on
EfficientNet-Lite0 at 256 px, 4 shots) and a camera replay folder that interleaves good parts and
defects as a line would deliver them. On a first start the registration runs in a background
thread (:func:`register_in_background`) so the page answers at once and shows its progress.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from inspector.products.progress import StageProgress, StartupStatus

SAMPLE_PRODUCT = "brick"
SAMPLE_SHOTS = 4
SAMPLE_SIZE = 256


def prepare_sample(station, *, backbone: str = "efficientnet-lite0", image_size: int = SAMPLE_SIZE,
                   shots: int = SAMPLE_SHOTS, log=print, register: bool = True) -> tuple[Path, Path]:
    """Build the sample dataset, make a camera replay folder mixing good and defective test images
    and (``register``) register the sample product if it is not registered yet.

    Returns ``(dataset folder, replay folder)``.
    """
    from inspector.synth.samples import build_sample

    folder = Path(build_sample(SAMPLE_PRODUCT))
    replay = replay_folder(station, folder)
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


def replay_folder(station, folder: Path) -> Path:
    """``<data dir>/camera-replay/<sample>``: the sample's test images, two good parts then one
    defect, as a line would deliver them; made once (written beside it, then renamed)."""
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


def register_in_background(station, folder: Path, status: StartupStatus) -> threading.Thread:
    """First start: register the sample product in a thread while the page already answers; the
    page's banner shows ``status`` (stage, fold i/n, time left)."""

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


__all__ = ["SAMPLE_PRODUCT", "SAMPLE_SHOTS", "SAMPLE_SIZE", "prepare_sample", "register_in_background",
           "register_sample", "replay_folder"]
