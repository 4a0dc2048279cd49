"""Products: a named, versioned, calibrated detector for one part. :mod:`.product` (the record,
its version rule, errors), :mod:`.calibration` (held-out scores for the thresholds),
:mod:`.runtime` (the model serving a product, torch or ONNX), :mod:`.registry` (register,
re-fit, set thresholds, delete, load, inspect), :mod:`.heatmap` (operator overlays scaled by the
product's thresholds), :mod:`.progress` (stage progress of a registration, for any front end)."""
