"""Deployment: :mod:`.export` (ONNX export with a parity check, using each detector's own scoring
module) and :mod:`.onnx` / :mod:`.runtime` (onnxruntime sessions on CPU or CUDA)."""
