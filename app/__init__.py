"""The Gradio inspection station: a thin layer over :mod:`inspector` (no detection logic here).

:mod:`app.shell` holds :class:`~app.shell.StationApp` (``build_app(station, config)`` returns the
``gr.Blocks``; ``launch(station, config)`` serves it with the configured safe defaults, see
:mod:`inspector.station.config`); :mod:`app.tabs` holds one module per tab; :mod:`app.views`
formats the library's answers as HTML and tables; :mod:`app.serve` is the ``inspector serve``
command, which joins the command line through the ``inspector.commands`` entry point.
"""
