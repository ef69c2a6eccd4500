"""Fine-tuning Stable Diffusion with a memorization guard.

* :mod:`memreg.training.config` - nested dataclass config, YAML + CLI overrides, validation;
* :mod:`memreg.training.data` - imagefolder / hub datasets, preprocessing, held-out split, sampler;
* :mod:`memreg.training.setup` - model loading, LoRA / full fine-tuning, precision, EMA, clipping;
* :mod:`memreg.training.loop` - ``train(cfg)``: the loop with the guard (:mod:`memreg.guards`)
  and the monitor (:mod:`memreg.monitor`);
* :mod:`memreg.training.checkpoint` - save/load hooks, resume, LoRA (diffusers + kohya) outputs;
* :mod:`memreg.training.metrics` - step timing, peak memory.

Entry point: ``train/train.py``.
"""
