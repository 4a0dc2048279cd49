"""AnomalyCLIP (zero-shot, learned object-agnostic prompts, DPAM) on a CLIP backbone."""
