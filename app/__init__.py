"""The Gradio inspection station: a thin layer over :mod:`inspector` (no detection logic here).

``build_app(station, config)`` returns the ``gr.Blocks``; ``launch(station, config)`` serves it
with the configured safe defaults (see :mod:`inspector.station.config`).
"""

from .station import StationApp, build_app, launch

__all__ = ["StationApp", "build_app", "launch"]
