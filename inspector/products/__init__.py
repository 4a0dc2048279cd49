"""Products: a named, versioned, calibrated detector for one part. :mod:`.product` (the record,
its version rule, errors), :mod:`.calibration` (held-out scores for the thresholds),
:mod:`.runtime` (the model serving a product, torch or ONNX), :mod:`.registry` (register,
re-fit, refit on evidence, promote / roll back, set thresholds, delete, load, inspect),
:mod:`.versions` (immutable version files, activation history, the before/after table),
:mod:`.refit` (what each detector kind learns from operator evidence, held out),
:mod:`.feedback` (operator decisions as evidence, the kept images), :mod:`.heatmap` (operator
overlays scaled by the product's thresholds), :mod:`.progress` (stage progress of a
registration or refit, for any front end)."""
