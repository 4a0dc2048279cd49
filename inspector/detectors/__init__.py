"""Anomaly detectors behind one protocol with declared capabilities (base.py), listed by name in
registry.py (baselines from other libraries included), sharing map operations (ops.py) and one
CLIP forward (shared_pass.py). Each detector is a package: torch_model.py (the pure scoring that
ONNX export traces) and detector.py (fit, state, the protocol)."""
