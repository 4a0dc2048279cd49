"""An asyncio server on a daemon thread of its own, shared by the OPC UA and Modbus servers.

Why a thread: the station (Gradio, the line pipeline) is threaded; the PLC-facing servers are
asyncio. ``start()`` blocks until the subclass's ``_main()`` sets ``_started`` (or fails), so a
server that cannot bind reports it to the caller instead of dying silently in its thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger(__name__)


class LoopThreadServer:
    """Subclasses set ``label`` and implement ``async _main()``, which sets ``self._started``
    once serving; ``stop()`` is theirs (each library shuts down differently), ending in
    :meth:`_join`."""

    label = "server"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0):
        self._thread = threading.Thread(target=self._run, name=f"{self.label}-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"{self.label} server did not start")
        if self._error is not None:
            raise RuntimeError(f"{self.label} server failed to start: {self._error}") from self._error
        return self

    def _join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            log.exception("%s: server stopped with an error", self.label)
        finally:
            self._started.set()
            loop.close()

    async def _main(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
