"""The station service: one process that inspects, stores every result and serves the operators.

:mod:`.service` (``StationService``: inspect, decide, batch, history over one product registry and
one store), :mod:`.store` (SQLAlchemy: SQLite by default, PostgreSQL), :mod:`.config` (the station
settings file and environment), :mod:`.sample` (the sample product of ``serve --sample``).
Passwords and login throttling live in :mod:`inspector.security`.
"""
