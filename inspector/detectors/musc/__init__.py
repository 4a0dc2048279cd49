"""MuSc (zero-shot mutual scoring of unlabeled images: LNAMD, MSM, RsCIN)."""
