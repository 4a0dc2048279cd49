"""On the line: the trigger -> verdict pipeline and verdicts to the line controller.

:mod:`.config` (the ``[line]`` config tables), :mod:`.pipeline` (bounded trigger -> inspection ->
verdict queue), :mod:`.sinks` (OPC UA, Modbus TCP, Prometheus ``/metrics`` and ``/health``),
:mod:`.runner` (wires them into a running line station). Cameras live in :mod:`inspector.cameras`.
Importing this package imports none of the optional stacks.
"""
