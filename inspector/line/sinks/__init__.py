"""Where line verdicts go: :mod:`.opcua` (OPC UA server), :mod:`.modbus` (Modbus TCP reject gate),
:mod:`.metrics` (Prometheus ``/metrics`` and ``/health``)."""
