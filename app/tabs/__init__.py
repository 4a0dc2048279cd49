"""One module per tab of the station: each holds a mixin of :class:`app.shell.StationApp` with the
tab's handlers (``on_*``), its layout (``layout_<tab>``) and its events (``events_<tab>``)."""
