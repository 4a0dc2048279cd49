"""Defect-Gen style diffusion generator (after Defect Spectrum, Yang et al., ECCV 2024).

What it keeps from Defect-Gen:

* **Image and mask generated jointly**: every training sample is 4 channels, RGB in [-1, 1] and
  the defect mask in {-1, +1}; the network denoises all four together, so each generated defect
  comes with its own mask.
* **Two models, split over the timesteps**: a *large-receptive-field* UNet (several down-sampling
  levels and mid-block attention: it sees the whole patch) handles the early, high-noise steps
  ``t >= switch_t`` where the global shape/layout of the defect is decided; a
  *small-receptive-field* UNet (one down-sampling level, no attention: ~patch-level statistics,
  as in SinDiffusion on which Defect-Gen builds) handles the late steps ``t < switch_t`` and
  paints the texture. ``switch_t`` is configurable at training and at sampling time. Each model
  is trained on its own timestep range (with some overlap), which halves the work of each.
  The large model predicts x0 (Defect-Gen's parameterisation: clean layouts and binary masks
  after a few hundred steps, where epsilon-prediction still gives noise); the small one predicts
  v, which keeps texture detail that x0 regression averages away; sampling converts both to x0.
* **Few images suffice**: training is patch-level -- random ``patch`` x ``patch`` crops centred
  (with jitter) on defect pixels, with flips and 90-degree rotations -- so five annotated defect
  images give thousands of distinct samples. The working resolution is chosen at fit time so
  that most defects fit in a patch (large defects: train and generate on a downsampled image).

What is added for an inspection product:

* **Inpainting into normal images** (RePaint-style, with optional resampling): a crop of a
  normal image (and an all-"no defect" mask channel) is the known region; only a sampled region
  inside the crop is generated, so the defect lands on a real part. At every step the known
  region is replaced by the forward-noised normal crop.
* **Exact masks**: the final mask is the generated mask channel thresholded at 0, restricted to
  the generated region, cleaned of specks; the output is the normal image outside the mask and
  the generated pixels inside, with a minimum change enforced, so ``mask == changed pixels``.
  An empty mask is retried with new noise, then falls back to the weight-free generator (the
  ``stats`` attribute counts both).

Seeded and reproducible (numpy ``Generator`` in, torch generators derived from it); tqdm bars
for training and sampling; CUDA when present (bf16 autocast), CPU otherwise. Saved with
``save_pretrained`` (safetensors) for each UNet plus ``defectgen.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from inspector.backbones.base import default_device
from inspector.synth.diffusion.checks import _drop_specks, _fill_holes, changed_pixels, mask_iou
from inspector.synth.diffusion.data import _fit_scale, _PatchSampler, _to_rgb
from inspector.synth.diffusion.model import DefectGenConfig, _unet
from inspector.synth.diffusion.train import _fit_key, _load_checkpoint, _save_checkpoint, _warmup_cosine
from inspector.synth.fallback import enforce_change
from inspector.synth.fallback import make_defect as fallback_defect

FORMAT_VERSION = 1
CONFIG_NAME = "defectgen.json"


class DefectGen:
    """Two-stage joint image+mask diffusion defect generator. See the module docstring."""

    def __init__(self, config: DefectGenConfig | None = None, large=None, small=None,
                 device: str | torch.device | None = None):
        self.config = config or DefectGenConfig()
        self.device = torch.device(device or default_device())
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.config.seed)
            large = large or _unet(self.config, True)
            small = small or _unet(self.config, False)
        self.large = large.to(self.device).eval()
        self.small = small.to(self.device).eval()
        self.history: dict[str, list[float]] = {}
        self.path: Path | None = None
        self.stats = {"diffusion": 0, "fallback": 0, "retries": 0, "rejected_empty": 0, "rejected_iou": 0}

    # ---- schedules
    def _train_scheduler(self):
        from diffusers import DDPMScheduler

        c = self.config
        return DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule)

    def _sample_scheduler(self):
        from diffusers import DDIMScheduler

        c = self.config
        # every model output is converted to an x0 estimate first (see _x0), so each model may
        # have its own parameterisation
        return DDIMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                             prediction_type="sample", clip_sample=True)

    def _ptype(self, large: bool) -> str:
        c = self.config
        return c.prediction_type if large or not c.small_prediction_type else c.small_prediction_type

    @staticmethod
    def _x0(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ptype: str) -> torch.Tensor:
        if ptype == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt()
        if ptype == "v_prediction":
            return a.sqrt() * x - (1 - a).sqrt() * out
        return out

    def _t_range(self, large: bool) -> tuple[int, int]:
        c = self.config
        T, s = c.num_train_timesteps, c.switch_t
        if large:
            return max(0, int(s - c.overlap * s)), T
        return 0, min(T, int(s + c.overlap * (T - s)) + 1)

    @property
    def parameters_count(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in m.parameters()) for n, m in (("large", self.large), ("small", self.small))}

    # ---- training
    def _loss(self, model, sched, x0, t, noise, pt: str):
        xt = sched.add_noise(x0, noise, t)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
        with autocast:
            pred = model(xt, t).sample
        target = noise if pt == "epsilon" else sched.get_velocity(x0, noise, t) if pt == "v_prediction" else x0
        err = (pred.float() - target) ** 2
        w = torch.ones(4, device=x0.device)
        w[3] = self.config.mask_weight
        return (err.mean(dim=(0, 2, 3)) * w).sum() / w.sum()

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, steps: int | None = None,
            progress: bool = True, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100,
            callback=None) -> dict[str, list[float]]:
        """Train both UNets on patch crops of ``images`` (RGB uint8) around ``masks`` (HxW).

        ``checkpoint``: a file written every ``checkpoint_every`` steps (weights, optimiser, LR
        schedule, both random streams, losses); when it exists and was made for the same config
        and data, training resumes from it and ends exactly as an uninterrupted run would. It is
        removed when training completes. ``callback(stage, step, loss)`` runs after every step.
        Returns (and keeps in ``history``) the per-step losses of each model.
        """
        from tqdm.auto import tqdm

        c = self.config
        if len(images) != len(masks) or not len(images):
            raise ValueError("fit needs as many masks as images, at least one")
        rgb = [_to_rgb(i) for i in images]
        self.config.gray = all(int(np.ptp(i.astype(np.int16), axis=2).max()) <= 2 for i in rgb)
        if c.auto_scale:
            c.image_size = _fit_scale(rgb, masks, c)
        sampler = _PatchSampler(rgb, masks, c, self.device)
        sched = self._train_scheduler()
        sched.alphas_cumprod = sched.alphas_cumprod.to(self.device)
        steps = int(steps or c.train_steps)
        rng = np.random.default_rng(c.seed)
        g = torch.Generator(self.device).manual_seed(c.seed)
        ckpt = Path(checkpoint) if checkpoint else None
        key = _fit_key(c, steps, rgb, masks)
        resume = _load_checkpoint(ckpt, key, self.device) if ckpt else None
        self.history = {}
        for name, model in (("large", self.large), ("small", self.small)):
            lo, hi = self._t_range(name == "large")
            opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=1e-4)
            lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
            losses: list[float] = []
            done = 0
            if resume is not None:
                model.load_state_dict(resume["models"][name])
                if resume["stage"] == name:
                    opt.load_state_dict(resume["opt"])
                    lr_sched.load_state_dict(resume["lr"])
                    done = int(resume["step"])
                    rng.bit_generator.state = json.loads(resume["np_rng"])
                    g.set_state(resume["torch_rng"].cpu())
                    losses = list(resume["history"].get(name, []))
                    self.history = {k: list(v) for k, v in resume["history"].items() if k != name}
                    resume = None
                else:  # the checkpoint is past this stage: it is finished
                    losses = list(resume["history"].get(name, []))
                    done = steps
            model.train()
            bar = tqdm(range(done, steps), desc=f"train {name} (t {lo}-{hi - 1})", disable=not progress, leave=False,
                       initial=done, total=steps)
            for i in bar:
                x0 = sampler(c.batch_size, rng)
                t = torch.randint(lo, hi, (x0.shape[0],), generator=g, device=self.device)
                noise = torch.randn(x0.shape, generator=g, device=self.device)
                loss = self._loss(model, sched, x0, t, noise, self._ptype(name == "large"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                lr_sched.step()
                losses.append(float(loss.detach()))
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
                if ckpt and ((i + 1) % checkpoint_every == 0 or i + 1 == steps):
                    hist = {**self.history, name: losses}
                    _save_checkpoint(ckpt, key, name, i + 1, self, opt, lr_sched, rng, g, hist)
                if callback is not None:
                    callback(name, i + 1, losses[-1])
            model.eval()
            self.history[name] = losses
        if ckpt:
            ckpt.unlink(missing_ok=True)
        self._sampler = sampler
        return self.history

    @torch.no_grad()
    def eval_loss(self, images, masks, n: int = 32, seed: int = 123) -> dict[str, float]:
        """Loss of each model on a fixed set of crops, timesteps and noise (for comparisons)."""
        c = self.config
        sampler = _PatchSampler([_to_rgb(i) for i in images], masks, c, self.device)
        rng = np.random.default_rng(seed)
        g = torch.Generator(self.device).manual_seed(seed)
        x0 = sampler(n, rng)
        sched = self._train_scheduler()
        sched.alphas_cumprod = sched.alphas_cumprod.to(self.device)
        out = {}
        for name, model in (("large", self.large), ("small", self.small)):
            lo, hi = self._t_range(name == "large")
            t = torch.randint(lo, hi, (n,), generator=g, device=self.device)
            noise = torch.randn(x0.shape, generator=g, device=self.device)
            out[name] = float(self._loss(model, sched, x0, t, noise, self._ptype(name == "large")))
        return out

    # ---- sampling
    def _model_at(self, t: int, switch_t: int):
        return self.large if t >= switch_t else self.small

    @torch.no_grad()
    def sample(self, known: torch.Tensor | None = None, region: torch.Tensor | None = None, *,
               n: int | None = None, seed: int = 0, switch_t: int | None = None,
               steps: int | None = None, resample: int | None = None, progress: bool = False) -> torch.Tensor:
        """Run the two-stage reverse process; returns ``(B, 4, P, P)`` in [-1, 1].

        ``known`` (B,4,P,P) and ``region`` (B,1,P,P, 1 = generate) make it an inpainting run;
        without them it samples ``n`` unconditional patches.
        """
        from tqdm.auto import tqdm

        c = self.config
        switch_t = c.switch_t if switch_t is None else int(switch_t)
        steps = steps or c.sample_steps
        resample = max(1, resample or c.resample)
        p = c.patch
        if known is None:
            known = torch.zeros(n or 1, 4, p, p, device=self.device)
            region = torch.ones(n or 1, 1, p, p, device=self.device)
        known, region = known.to(self.device).float(), region.to(self.device).float()
        g = torch.Generator(self.device).manual_seed(int(seed))
        sched = self._sample_scheduler()
        sched.set_timesteps(steps, device=self.device)
        acp = sched.alphas_cumprod.to(self.device)
        x = torch.randn(known.shape, generator=g, device=self.device)
        ts = [int(t) for t in sched.timesteps]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
        for i, t in enumerate(tqdm(ts, desc="sample", disable=not progress, leave=False)):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            model = self._model_at(t, switch_t)
            tt = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
            for r in range(resample):
                noise_k = torch.randn(known.shape, generator=g, device=self.device)
                known_t = acp[t].sqrt() * known + (1 - acp[t]).sqrt() * noise_k
                x = region * x + (1 - region) * known_t
                with autocast:
                    out = model(x, tt).sample.float()
                out = self._x0(out, x, acp[t], self._ptype(model is self.large))
                x_prev = sched.step(out, t, x, eta=c.eta, generator=g).prev_sample
                if r + 1 < resample and t_prev >= 0:  # RePaint: diffuse back to t and redo the step
                    a = acp[t] / acp[t_prev]
                    x = a.sqrt() * x_prev + (1 - a).sqrt() * torch.randn(x.shape, generator=g, device=self.device)
            x = x_prev
        return (region * x + (1 - region) * known).clamp(-1, 1)

    def _region(self, rng: np.random.Generator, severity: float | None = None) -> np.ndarray:
        """Ellipse (uint8 PxP) where the defect may be generated; ``severity`` scales its radii from
        half the configured low radius (0) to the configured high radius (1)."""
        p = self.config.patch
        lo, hi = self.config.region
        if severity is not None:
            r = 0.5 * lo + float(severity) * (hi - 0.5 * lo)
            lo, hi = 0.9 * r, min(0.5, 1.1 * r)
        m = np.zeros((p, p), np.uint8)
        centre = (int(round(p / 2 + rng.uniform(-p / 10, p / 10))), int(round(p / 2 + rng.uniform(-p / 10, p / 10))))
        axes = (max(2, int(rng.uniform(lo, hi) * p)), max(2, int(rng.uniform(lo, hi) * p)))
        cv2.ellipse(m, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        return m

    def _scale(self, rgb: np.ndarray) -> float:
        s = self.config.image_size
        return (min(rgb.shape[:2]) / s) if s else 1.0

    def make_defects(self, normal_images: Sequence[np.ndarray], rng: np.random.Generator, *,
                     switch_t: int | None = None, progress: bool = False,
                     severity: float | Sequence[float] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """One defect per image, batched: ``[(rgb uint8, mask uint8 {0,1})]``; masks are exactly
        the changed pixels and non-empty (fallback generator after ``retries`` rejected draws).

        ``severity`` (one value, or one per image; None = unconditioned): size of the generated
        region, contrast of the generated pixels against the normal ones, and edge blending.
        A draw is rejected (``stats``: ``rejected_empty``, ``rejected_iou``) when its mask channel
        is empty or disagrees with where the image changed (IoU < ``config.min_mask_iou``).
        """
        from inspector.synth.severity import draw_severities

        c = self.config
        p = c.patch
        imgs = [_to_rgb(i) for i in normal_images]
        sev = None if severity is None else draw_severities(len(imgs), rng, severity)
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(imgs)
        todo = list(range(len(imgs)))
        for attempt in range(c.retries + 1):
            if not todo:
                break
            plans, knowns, regions = [], [], []
            for i in todo:
                img = imgs[i]
                h, w = img.shape[:2]
                side = max(8, min(h, w, int(round(p * self._scale(img)))))
                y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                crop = img[y0:y0 + side, x0:x0 + side]
                if side != p:
                    crop = cv2.resize(crop, (p, p), interpolation=cv2.INTER_AREA if side > p else cv2.INTER_CUBIC)
                reg = self._region(rng, None if sev is None else sev[i])
                k = torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1
                knowns.append(torch.cat([k, -torch.ones(1, p, p)]))
                regions.append(torch.from_numpy(reg.astype(np.float32))[None])
                plans.append((i, y0, x0, side, reg))
            seed = int(rng.integers(2**62))
            bs = 64 if self.device.type == "cuda" else 16
            outs = []
            for b in range(0, len(plans), bs):
                outs.append(self.sample(torch.stack(knowns[b:b + bs]), torch.stack(regions[b:b + bs]),
                                        seed=seed + b, switch_t=switch_t, progress=progress).cpu())
            gen = torch.cat(outs)
            failed = []
            for (i, y0, x0, side, reg), g, k in zip(plans, gen, knowns):
                res = self._compose(imgs[i], g, reg, y0, x0, side, known=k,
                                    severity=None if sev is None else float(sev[i]))
                if res is None:
                    failed.append(i)
                else:
                    results[i] = res
                    self.stats["diffusion"] += 1
            if attempt < c.retries:
                self.stats["retries"] += len(failed)
            todo = failed
        for i in todo:
            results[i] = fallback_defect(imgs[i], rng, severity=None if sev is None else float(sev[i]))
            self.stats["fallback"] += 1
        return results  # type: ignore[return-value]

    def _compose(self, img, g: torch.Tensor, reg: np.ndarray, y0: int, x0: int, side: int,
                 known: torch.Tensor | None = None, severity: float | None = None):
        c = self.config
        rgb = ((g[:3].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)
        if c.gray:
            rgb = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
        mprob = g[3].numpy().astype(np.float32)
        if c.mask_smooth > 0:  # the texture stage leaves the mask channel grainy: smooth, fill holes
            mprob = cv2.GaussianBlur(mprob, (0, 0), c.mask_smooth)
        m = (mprob > 0) & (reg > 0)
        m = _drop_specks(_fill_holes(m), max(2, c.min_pixels // 4))
        if int(m.sum()) < c.min_pixels:
            self.stats["rejected_empty"] += 1
            return None
        if known is not None:
            base = ((known[:3].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)
            if mask_iou(m, changed_pixels(rgb, base, reg > 0)) < c.min_mask_iou:
                self.stats["rejected_iou"] += 1
                return None
            if severity is not None:  # contrast: pull the generated pixels towards the normal ones
                rgb = base + (0.3 + 0.7 * severity) * (rgb - base)
        if side != c.patch:  # back to the image's scale: interpolate the mask *channel*, not the mask
            interp = cv2.INTER_CUBIC if side > c.patch else cv2.INTER_AREA
            rgb = np.clip(cv2.resize(rgb, (side, side), interpolation=interp), 0, 255)
            keep = cv2.resize(m.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST) > 0
            keep = cv2.dilate(keep.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            mp = cv2.resize(mprob, (side, side), interpolation=cv2.INTER_LINEAR)
            rg = cv2.resize(reg.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR) > 0.5
            m = (mp > 0) & rg & keep
            if not m.any():
                return None
        blended = img.astype(np.float32).copy()
        full = np.zeros(img.shape[:2], bool)
        full[y0:y0 + side, x0:x0 + side] = m
        win = blended[y0:y0 + side, x0:x0 + side]
        alpha = m.astype(np.float32)
        if severity is not None:  # blend: faint defects fade in over a few pixels from their edge
            feather = 1.0 + 4.0 * (1.0 - severity)
            dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
            alpha = np.where(m, np.clip(dist / feather, 0.35, 1.0), 0.0).astype(np.float32)
        blended[y0:y0 + side, x0:x0 + side] = alpha[..., None] * rgb + (1 - alpha[..., None]) * win
        out = enforce_change(img, blended, full)
        changed = (out != img).any(axis=2)
        return out, changed.astype(np.uint8)

    def make_defect(self, rgb: np.ndarray, rng: np.random.Generator,
                    severity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Same contract as :func:`inspector.synth.fallback.make_defect`."""
        return self.make_defects([rgb], rng, severity=severity)[0]

    @property
    def version(self) -> str:
        """Content hash of both UNets' weights and the config: what a product records."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for m in (self.large, self.small):
            for k, v in sorted(m.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.large.save_pretrained(path / "large", safe_serialization=True)
        self.small.save_pretrained(path / "small", safe_serialization=True)
        meta = {"format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                "parameters": self.parameters_count,
                "final_loss": {k: float(np.mean(v[-50:])) for k, v in self.history.items() if v}}
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> DefectGen:
        from diffusers import UNet2DModel

        path = Path(path)
        meta_file = path / CONFIG_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a DefectGen model (no {CONFIG_NAME})")
        meta = json.loads(meta_file.read_text())
        cfg = DefectGenConfig.from_dict(meta["config"])
        large = UNet2DModel.from_pretrained(path / "large", use_safetensors=True, low_cpu_mem_usage=False)
        small = UNet2DModel.from_pretrained(path / "small", use_safetensors=True, low_cpu_mem_usage=False)
        gen = cls(cfg, large, small, device=device)
        gen.path = path
        return gen


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train_defectgen(images, masks, config: DefectGenConfig | None = None, *, device=None,
                    progress: bool = True) -> DefectGen:
    """Convenience: build and train a :class:`DefectGen`."""
    gen = DefectGen(config, device=device)
    gen.fit(images, masks, progress=progress)
    return gen


__all__ = ["CONFIG_NAME", "DefectGen", "train_defectgen"]
