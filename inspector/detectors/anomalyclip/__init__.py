"""AnomalyCLIP (zero-shot, learned object-agnostic prompts, DPAM) on a CLIP backbone: torch_model
(prompts, text encoder, visual scoring, loss, export graph), detector, train (prompt training on
an MVTec-layout folder), checkpoint (prompt files, official checkpoint import)."""
