"""Every detector by name, as data: ``name -> "module:Class"``, baselines included.

The table is the one list of detectors: the product registry, ``inspector eval`` and the
exporter resolve names here. Modules are imported on first use, so listing a detector costs
nothing and an optional dependency (anomalib for the baselines) is needed only when it runs.
What each class can do is declared on the class (:class:`~inspector.detectors.base.Capabilities`),
read with :func:`capabilities`.
"""

from __future__ import annotations

import importlib

from inspector.detectors.base import Capabilities, capabilities_of

DETECTORS: dict[str, str] = {
    "musc": "inspector.detectors.musc.detector:MuSc",
    "graphcore": "inspector.detectors.graphcore.detector:GraphCore",
    "patchcore": "inspector.detectors.graphcore.detector:PatchCoreKNN",
    "patchcore-aug": "inspector.detectors.graphcore.detector:AugmentedPatchCore",
    "anomalyclip": "inspector.detectors.anomalyclip.detector:AnomalyCLIP",
    # other libraries' models, for `inspector eval` only (capabilities.product is False)
    "anomalib-patchcore": "inspector.detectors.baselines:AnomalibPatchcore",
    "anomalib-patchcore-wrn50": "inspector.detectors.baselines:AnomalibPatchcoreStock",
    "anomalib-winclip": "inspector.detectors.baselines:AnomalibWinClip",
}


def detector_class(name: str) -> type:
    """The class registered as ``name`` (KeyError naming the known ones otherwise)."""
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    module, cls = DETECTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def product_detector_class(name: str) -> type:
    """The class registered as ``name`` when it can back a registered product; a KeyError naming
    the ones that can otherwise (the baselines are for ``inspector eval`` only)."""
    cls = detector_class(name)
    if not capabilities_of(cls).product:
        usable = [n for n in DETECTORS if capabilities(n).product]
        raise KeyError(f"unknown detector {name!r} for a product; known: {', '.join(usable)}")
    return cls


def capabilities(name: str) -> Capabilities:
    """The declared capabilities of the detector registered as ``name``."""
    return capabilities_of(detector_class(name))


__all__ = ["DETECTORS", "capabilities", "detector_class", "product_detector_class"]
