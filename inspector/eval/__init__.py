"""Evaluation (``inspector eval`` and the benches): :mod:`.data` (classes, test sets and shots
over the one MVTec reader), :mod:`.metrics` (the one AUROC and every other metric: anomalib's),
:mod:`.measure` (the one timing and the one memory helper), :mod:`.runner` (the protocol: fits,
seeds, timing), :mod:`.tables` (summaries, markdown and rich tables), :mod:`.plots` (curves)."""
