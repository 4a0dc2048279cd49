"""GraphCore (few-shot: memory bank of shots, graph head, isometric invariance) and the plain
PatchCore-style baselines it is measured against: torch_model (the scorer ONNX traces), detector
(fitting, state)."""
