"""Evaluation: :mod:`.runner` (the ``inspector eval`` protocol: data, shots, detectors, metrics,
tables), :mod:`.measure` (one timing and one memory helper), :mod:`.plots`."""
