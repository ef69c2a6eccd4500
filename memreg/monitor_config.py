"""The ``eval:`` section of a training config: periodic memorization monitoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COPY_DETECTORS = ("ssim", "sscd")  # built in; memreg.copy_detect.register_copy_detector adds others
SCORE_PRESETS = ("sd1", "sd2")
SCORE_SPACES = ("eps", "score")
ITEM_CLUSTER_KINDS = ("near", "exact")   # eval.item_clusters (memreg.training.item_clusters)
from memreg.score import NOISE_MODES  # noqa: E402  (one definition, shared with memreg detect)


@dataclass
class EvalConfig:
    enabled: bool = False
    every_n_steps: int = 100          # detection eval cadence; step 0 (base model) always runs when enabled
                                      # (0: only at step 0 and at the end)
    memorized_prompts: str | None = None   # explicit prompt file (txt or jsonl) of known-memorized prompts
    reference_prompts: str | None = None   # explicit prompt file of ordinary prompts
    heldout_prompts: str | None = None     # held-out captions from a file ...
    heldout_fraction: float = 0.0          # ... or this fraction of the training set kept out of training
    dup_min_count: int = 2                 # an image occurring >= this many times makes its captions "duplicated"
    duplicates_from: str | None = None     # an audit's clusters.jsonl: its clusters (near-duplicates included)
                                           # define "the same image" instead of the exact pixel hash
    item_clusters: str = "near"            # otherwise the trainer's items: "near" (an image joined with its
                                           # near-duplicates, as memreg audit finds them) | "exact" (pixels)
    item_clusters_dir: str | None = None   # cache of the trainer's item index (None: <output_dir>/item_clusters)
    max_prompts_per_group: int = 64
    seeds: int = 2                         # noise draws per prompt (fixed across evals)
    noise: str = "shared"                  # "shared" | "per-prompt": as `memreg detect --noise`
    batch_size: int = 16
    top_k: int = 10                        # highest-scoring training captions shown in the text table
    seed: int = 1234                       # seed of the eval's own generators (never the training RNG); noise
                                           # seeds seed .. seed+seeds-1 (= memreg detect --seed S --seeds N)
    # Anisotropy score (memreg.score.AnisotropyScore)
    preset: str | None = None              # "sd1" (g1=1, g2=2) | "sd2" (g1=1, g2=0.1); overrides g1/g2
    g1: float = 1.0                        # weight of the norm term
    g2: float = 2.0                        # weight of the alignment term
    t_hi: int | None = None                # None: first timestep of a 50-step DDIM run (981 for SD)
    t_lo: int | None = None                # None: third-to-last timestep of that run (41 for SD)
    score_space: str = "eps"               # "eps" | "score" (see AnisotropyScore's ``space``)
    # Ground-truth copy check (generation + similarity to training images)
    generate_every_n_steps: int = 0        # 0: only at the end of training; > 0: also at step 0 (baseline)
    generate_at_end: bool = True
    max_generate_prompts: int = 8          # per group
    num_images_per_prompt: int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    copy_detector: str = "ssim"            # "ssim" | "sscd" | a name registered in memreg.copy_detect
    sscd_path: str | None = None           # TorchScript file for copy_detector="sscd"
    copy_threshold: float | None = None    # None: the detector's calibrated default
    copy_resolution: int = 32              # side (px) the SSIM detector compares images at
    copy_max_shift: int = 2                # SSIM: best match over translations of up to this many px
    grid_rows: int = 8                     # generations shown per group in the TensorBoard image grid

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the ``eval.<field>`` that is out of range (fields set later are
        checked too: config loaders that ``setattr`` onto a default instance should call this)."""
        def bad(field: str, why: str):
            raise ValueError(f"eval.{field}: {why} (got {getattr(self, field)!r})")

        for name in ("every_n_steps", "generate_every_n_steps"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("max_prompts_per_group", "seeds", "batch_size", "num_images_per_prompt",
                     "num_inference_steps", "copy_resolution", "grid_rows"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.max_generate_prompts < 0:
            bad("max_generate_prompts", "must be >= 0")
        if self.copy_max_shift < 0:
            bad("copy_max_shift", "must be >= 0")
        if self.copy_resolution - 2 * self.copy_max_shift < 11:
            bad("copy_resolution", "minus 2 x copy_max_shift must be >= 11 px (the SSIM window)")
        if self.top_k < 0:
            bad("top_k", "must be >= 0")
        if self.dup_min_count < 2:
            bad("dup_min_count", "must be >= 2 (an image occurring once is not duplicated)")
        if self.duplicates_from is not None and not Path(self.duplicates_from).is_file():
            bad("duplicates_from", "no such file (expected memreg audit's clusters.jsonl)")
        if self.item_clusters not in ITEM_CLUSTER_KINDS:
            bad("item_clusters", f"must be one of {ITEM_CLUSTER_KINDS}")
        if self.item_clusters_dir is not None and Path(self.item_clusters_dir).exists() \
                and not Path(self.item_clusters_dir).is_dir():
            bad("item_clusters_dir", "exists and is not a directory")
        if not 0.0 <= self.heldout_fraction < 1.0:
            bad("heldout_fraction", "must be in [0, 1)")
        if self.preset is not None and self.preset not in SCORE_PRESETS:
            bad("preset", f"must be one of {SCORE_PRESETS} or null")
        if self.noise not in NOISE_MODES:
            bad("noise", f"must be one of {NOISE_MODES}")
        if self.score_space not in SCORE_SPACES:
            bad("score_space", f"must be one of {SCORE_SPACES}")
        if not isinstance(self.copy_detector, str) or not self.copy_detector:
            bad("copy_detector", f"must name a detector: one of {COPY_DETECTORS} or one registered with "
                "memreg.copy_detect.register_copy_detector")
        if self.copy_detector == "sscd" and not self.sscd_path:
            bad("sscd_path", "is required when copy_detector is 'sscd' (a TorchScript file; never downloaded)")
