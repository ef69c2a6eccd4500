"""The ``eval:`` section of a training config: periodic memorization monitoring."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    enabled: bool = False
    every_n_steps: int = 100          # detection eval cadence; step 0 (base model) always runs when enabled
    memorized_prompts: str | None = None   # explicit prompt file (txt or jsonl) of known-memorized prompts
    reference_prompts: str | None = None   # explicit prompt file of ordinary prompts
    heldout_prompts: str | None = None     # held-out captions from a file ...
    heldout_fraction: float = 0.0          # ... or this fraction of the training set kept out of training
    dup_min_count: int = 2                 # an image occurring >= this many times makes its captions "duplicated"
    max_prompts_per_group: int = 64
    seeds: int = 2                         # noise draws per prompt (fixed across evals)
    batch_size: int = 16
    top_k: int = 10                        # highest-scoring training captions shown in the text table
    seed: int = 1234                       # seed of the eval's own generators (never the training RNG)
    # Ground-truth copy check (generation + similarity to training images)
    generate_every_n_steps: int = 0        # 0: only at the end of training
    generate_at_end: bool = True
    max_generate_prompts: int = 8          # per group
    num_images_per_prompt: int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    copy_detector: str = "ssim"            # "ssim" | "sscd"
    sscd_path: str | None = None           # TorchScript file for copy_detector="sscd"
    copy_threshold: float | None = None    # None: the detector's calibrated default
