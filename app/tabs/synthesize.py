"""The Synthesize tab: generated defects on a product's stored shots (or an uploaded normal image),
with the exact mask outlined, optionally scored by the product.
"""

from __future__ import annotations

import gradio as gr
import numpy as np

from app import views
from app.common import _error, _generator_choice, _generator_choices
from inspector.io import ImageError, read_image


class SynthesizeTab:
    """Handlers and layout of the Synthesize tab (a part of :class:`app.shell.StationApp`)."""

    def _shot_images(self, product: str) -> list[np.ndarray]:
        try:
            return list(self._product(product).shot_images())
        except (OSError, ImageError):
            return []

    def on_synthesize(self, product: str, upload: str | None, kind: str, n: int, seed: int, score: bool,
                      severity: float | None = None):
        from inspector.synth import generate_defects

        if upload:
            normals = [read_image(upload)]
        elif product:
            normals = self._shot_images(product)
            if not normals:
                raise _error(f"No stored shots for {product}: upload a normal image.")
        else:
            raise _error("Choose a product or upload a normal image.")
        sev = None if severity is None or float(severity) < 0 else float(severity)
        pairs = generate_defects(normals, int(n), rng=int(seed), generator=_generator_choice(kind), severity=sev)
        captions = [f"#{i + 1} · defect {100 * m.mean():.1f}% of image" for i, (_, m) in enumerate(pairs)]
        if score and product:
            p = self._product(product)
            with self.model_lock:
                results = p.inspect([img for img, _ in pairs])
            captions = [f"#{i + 1} · {r.verdict} · {r.score:.3g}" for i, r in enumerate(results)]
        gallery = [(views.mask_outline(img, m), c) for (img, m), c in zip(pairs, captions)]
        return gallery

    # ---- layout and events ----------------------------------------------------------------
    def layout_synthesize(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``."""
        with gr.Tab("Synthesize", id="synth"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    ui.sy_product = gr.Dropdown(names, value=first, label="Product (uses its stored shots)")
                    ui.sy_upload = gr.Image(type="filepath", label="…or a normal image", sources=["upload"],
                                            height=200, image_mode=None)
                    ui.sy_kind = gr.Dropdown(["any", "perlin", "cutpaste", "scar"] + _generator_choices()[1:],
                                             value="any", label="Generator (weight-free kind or diffusion model)")
                    ui.sy_sev = gr.Slider(-0.05, 1, value=-0.05, step=0.05, label="Severity (below 0: spread 0-1)")
                    with gr.Row():
                        ui.sy_n = gr.Slider(1, 16, value=8, step=1, label="How many")
                        ui.sy_seed = gr.Number(0, precision=0, label="Seed")
                    ui.sy_score = gr.Checkbox(True, label="Score them with the product")
                    ui.sy_btn = gr.Button("Generate", variant="primary")
                with gr.Column(scale=3):
                    ui.sy_gallery = gr.Gallery(label="Generated defects (exact mask outlined in red)", columns=4,
                                               height=520, object_fit="contain")

    def events_synthesize(self, ui) -> None:
        """Generate (and score) defects."""
        ui.sy_btn.click(self.on_synthesize,
                        [ui.sy_product, ui.sy_upload, ui.sy_kind, ui.sy_n, ui.sy_seed, ui.sy_score, ui.sy_sev],
                        [ui.sy_gallery], api_name="synthesize")
