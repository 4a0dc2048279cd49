"""Registration progress as a person reads it: one fraction, a description and the time left.

:meth:`inspector.products.registry.ProductRegistry.register` reports ``progress(stage, done,
total)`` per stage (a :data:`Progress` callback, stages :data:`REGISTER_STAGES`, called through
:func:`report_progress`). :class:`StageProgress` turns that into
one overall fraction, so every front end (the web station's progress bar, ``inspector serve
--sample``'s first-start banner, a log line) shows the same numbers. :class:`StartupStatus` holds
what a station is doing before it is ready; a worker thread writes it and a page reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Registration progress callback: ``progress(stage, done, total)``.
Progress = Callable[[str, int, int], None]
#: The stages a registration reports, in order ("generated defects" interleaves with the folds).
REGISTER_STAGES = ("held-out scoring", "generated defects", "fit", "save")
#: The stages a refit reports (:meth:`~inspector.products.registry.ProductRegistry.refit`):
#: "before" scores the evidence with the active version, "evidence" obtains the candidate's
#: held-out scores of it; the others as in a registration.
REFIT_STAGES = ("before", "fit", "evidence", "held-out scoring", "generated defects", "save")


def report_progress(progress: Progress | None, stage: str, done: int, total: int) -> None:
    """Call ``progress`` if given; a failing callback (a closed browser tab) never stops a registration."""
    if progress is None:
        return
    try:
        progress(stage, int(done), int(total))
    except Exception:  # noqa: BLE001
        log.debug("progress callback failed", exc_info=True)


class StageProgress:
    """Turns ``progress(stage, done, total)`` from ProductRegistry.register into an overall fraction,
    a description and an ETA (time elapsed over the fraction done)."""

    # share of the whole registration each stage takes (measured on the sample product)
    # (fit first: its learned head is reused by the held-out folds)
    SPANS = {"fit": (0.02, 0.55), "held-out scoring": (0.55, 0.95), "save": (0.95, 1.0)}
    #: the same for a refit (:data:`REFIT_STAGES`)
    REFIT_SPANS = {"before": (0.0, 0.05), "fit": (0.05, 0.5), "evidence": (0.5, 0.6),
                   "held-out scoring": (0.6, 0.95), "save": (0.95, 1.0)}

    def __init__(self, sink: Callable[[float, str], object], spans: dict | None = None):
        self.sink = sink  # sink(fraction, description)
        self.spans = self.SPANS if spans is None else spans
        self.t0 = time.perf_counter()
        self.defects = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "generated defects":
            self.defects = f" · {done}/{total} generated defects"
            return
        a, b = self.spans.get(stage, (0.0, 0.0))
        frac = a + (b - a) * (done / total if total else 1.0)
        elapsed = time.perf_counter() - self.t0
        eta = f" · about {elapsed * (1 - frac) / frac:.0f} s left" if frac > 0.05 else ""
        what = {"held-out scoring": f"held-out scoring fold {done}/{total}" + self.defects,
                "before": f"scoring the evidence with the active version {done}/{total}",
                "evidence": "held-out scores of the evidence" + (" done" if done >= total else ""),
                "fit": "fitting the detector on all shots" if done < total else "fitted",
                "save": "saving" if done < total else "saved"}.get(stage, f"{stage} {done}/{total}")
        self.sink(frac, f"{what} · {elapsed:.0f} s{eta}")


class StartupStatus:
    """What the station is doing before it is ready (first start: registering the sample product),
    shown as a banner with progress; thread-safe (set from the worker thread, read by the page)."""

    def __init__(self, message: str = ""):
        self._lock = threading.Lock()
        self.message, self.fraction, self.state = message, 0.0, "running" if message else "done"
        self.t0 = time.monotonic()

    def update(self, message: str, fraction: float | None = None, state: str = "running") -> None:
        with self._lock:
            self.message, self.state = message, state
            if fraction is not None:
                self.fraction = float(fraction)

    def snapshot(self) -> tuple[str, float, str, float]:
        with self._lock:
            return self.message, self.fraction, self.state, time.monotonic() - self.t0


__all__ = ["REFIT_STAGES", "REGISTER_STAGES", "Progress", "StageProgress", "StartupStatus", "report_progress"]
