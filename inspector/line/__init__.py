"""On the line: GenICam cameras, the trigger -> verdict pipeline, verdicts to the line controller
(OPC UA, Modbus TCP) and observability (Prometheus metrics, health).

One module per job: :mod:`.genicam` (camera source), :mod:`.config` (the ``[line]`` config
tables), :mod:`.pipeline` (bounded trigger -> inspection -> verdict queue), :mod:`.opcua` and
:mod:`.modbus` (PLC interfaces), :mod:`.metrics` (``/metrics`` and ``/health``), :mod:`.runner`
(wires them into a running line station). Importing this package imports none of the optional
stacks: Aravis is loaded only when a ``genicam://`` source is opened.
"""
