"""MuSc (zero-shot mutual scoring of unlabeled images): torch_model (LNAMD, MSM, RsCIN),
budget (FLOPs, memory model, block sizing), detector (the set-level pipeline)."""
