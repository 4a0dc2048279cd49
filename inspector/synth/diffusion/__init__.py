"""Defect-Gen style diffusion defect generator, one job per module.

The generator (two UNets denoising image and mask jointly, inpainting into normal images) is
described in :mod:`inspector.synth.diffusion.generator`. The modules, lowest first:

* :mod:`~inspector.synth.diffusion.model`: the hyperparameters (``DefectGenConfig``) and the UNets
  they build; nothing here knows about images or training.
* :mod:`~inspector.synth.diffusion.data`: defect images and masks in (loading, estimated masks,
  working resolution) and the random training crops out.
* :mod:`~inspector.synth.diffusion.checks`: what a sampled patch must satisfy to count as a defect
  (mask cleaning, mask-vs-changed-pixels agreement).
* :mod:`~inspector.synth.diffusion.train`: what makes a training run resumable (run identity,
  checkpoints, learning-rate schedule).
* :mod:`~inspector.synth.diffusion.generator`: ``DefectGen`` itself (training loop, sampling,
  saving and loading) and ``train_defectgen``.

Nothing is re-exported here: import from the module that holds the name.
"""
