"""GraphCore (few-shot: memory bank of shots; optional augmented views, graph head, global branch,
each switched on per product only by its real evidence) and the plain PatchCore-style baselines it
is measured against: torch_model (the scorer ONNX traces), detector (fitting, state), selection
(the rule on real evidence), training (the graph head's training)."""
