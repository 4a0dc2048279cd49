"""Products: a named, versioned, calibrated detector for one part. :mod:`.registry` (register,
calibrate, save, load, inspect), :mod:`.heatmap` (operator overlays scaled by the product's
thresholds)."""
