"""Inference runtimes behind one face: anything with ``.inspect(list[np.ndarray]) -> list[Inspection]``.

``load_runtime(target, runtime="onnx")`` returns

* for an ``.onnx`` path: an :class:`~inspector.deploy.onnx.OnnxRunner` on it;
* for a :class:`~inspector.products.product.Product` (or a product name with ``registry=``): with
  ``runtime="torch"`` the product itself; with ``runtime="onnx"`` a runner on the product's
  exported graph, exporting it on first use into the product's folder (``model.onnx`` +
  ``model.json``) and re-exporting when the fitted model changed (refit, new shots) or the graph
  was written by another inspector version. A threshold change needs no re-export: the runner
  takes the product's current thresholds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from inspector import __version__
from inspector.deploy.onnx import OnnxRunner

RUNTIMES = ("torch", "onnx")
PRODUCT_ONNX = "model.onnx"


def product_onnx_path(product, registry=None) -> Path:
    """Where a product's exported graph is cached: ``<product folder>/model.onnx``."""
    folder = Path(product.path) if product.path is not None else None
    if folder is None and registry is not None:
        folder = Path(registry.root) / product.name
    if folder is None:
        raise ValueError(f"cannot tell where product {product.name!r} is stored; pass an .onnx path instead")
    if folder.suffix:  # a file inside the product folder
        folder = folder.parent
    return folder / PRODUCT_ONNX


def load_runtime(target: Any, runtime: str = "onnx", *, registry=None, device: str | None = None,
                 batch_size: int = 8, reexport: bool = False):
    """An object with ``.inspect(images) -> list[Inspection]`` for ``target`` on ``runtime``."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if isinstance(target, (str, os.PathLike)) and str(target).endswith(".onnx"):
        if runtime != "onnx":
            raise ValueError(f"{target} is an ONNX file; it runs only with runtime='onnx'")
        return OnnxRunner(target, device=device, batch_size=batch_size)
    product = target
    if isinstance(target, str):
        if registry is None:
            raise ValueError(f"product name {target!r} given without a registry")
        product = registry.get(target)
    if runtime == "torch":
        return product
    path = product_onnx_path(product, registry)
    if not reexport and path.is_file():
        try:
            runner = OnnxRunner(path, device=device, batch_size=batch_size)
            # The graph depends on the fitted model, not on the thresholds (those come from the
            # product each time), so a threshold change does not force a re-export.
            # An upgrade of inspector may change how a detector scores; never reuse a graph
            # exported by another version.
            same_code = runner.meta.get("versions", {}).get("inspector") == __version__
            if runner.product == product.name and runner.meta.get("model_hash") == getattr(product, "model_hash", None) \
                    and runner.meta.get("model_hash") and same_code:
                runner.thresholds = product.thresholds  # thresholds change without a refit
                return runner
        except (ValueError, FileNotFoundError):
            pass  # stale, corrupt or foreign: export afresh below
    from inspector.deploy.export import export_product

    export_product(product, path)
    runner = OnnxRunner(path, device=device, batch_size=batch_size)
    runner.thresholds = product.thresholds
    return runner


__all__ = ["PRODUCT_ONNX", "RUNTIMES", "load_runtime", "product_onnx_path"]
