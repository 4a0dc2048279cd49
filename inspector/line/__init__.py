"""On the line: the trigger -> verdict pipeline and verdicts to the line controller.

:mod:`.config` (the ``[line]`` config tables), :mod:`.pipeline` (bounded trigger -> inspection ->
verdict queue), :mod:`.sinks` (OPC UA, Modbus TCP, Prometheus ``/metrics`` and ``/health``),
:mod:`.loopthread` (the asyncio thread the OPC UA and Modbus servers run on), :mod:`.runner` (wires
them into a running line station). Cameras live in :mod:`inspector.cameras` (opened through its
scheme registry). Importing this package imports none of the optional stacks.
"""
