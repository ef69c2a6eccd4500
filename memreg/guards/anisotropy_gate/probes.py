"""Probe sampling: which captions of a batch are probed, on which noise, as which UNet inputs.

Each active optimizer step the sampler takes ``probes_per_step`` captions of the batch, draws
pure-noise latents from its **own** ``torch.Generator`` (the training RNG stream is never touched,
so a guard that only measures reproduces the plain run) and builds the scorer's UNet batch
``[u@t_hi, c@t_hi, u@t_lo, c@t_lo]`` (signal ``norm``: the ``t_hi`` half only; ``align``: the
``t_lo`` half only, whose value is ``g2 * align``). The training loop concatenates it onto the
denoising batch and runs one UNet forward; :meth:`ProbeSampler.values_from_output` turns the probe
part of the output back into per-probe values (through ``memreg.score``'s ``from_unet_output``, so
gradients flow through the score). A reference with a base-value cache fixes each caption's noise
(:func:`caption_latents`), so the trained forward sees the noise its cached value was taken on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from memreg.guards.anisotropy_gate.config import resolve_every_n
from memreg.guards.anisotropy_gate.gate import caption_keys
from memreg.score import AnisotropyScore, ScoreOutput, prompt_seed, score_prompts

SIGNAL_TERMS = {"combined": "both", "norm": "norm", "align": "align"}   # signal -> memreg.score.TERM_SETS

PROBE_MEMORY_SHARE = 0.2   # probe samples / denoising samples above which "auto" checkpoints probe steps:
                           # activations grow with samples, so below it peak memory stays <= 1.2x plain

PROBE_FORWARDS = {"fused": "in the denoising UNet forward (one forward per backward)",
                  "separate": "in a separate UNet forward (guard.fused_forward=false)",
                  "measure": "in a separate no-grad forward (weight 0: measured, no training effect)"}


def auto_probe_checkpointing(probe_samples: int, batch_size: int, gradient_checkpointing: bool) -> bool:
    """Whether ``probe_checkpointing: auto`` recomputes activations on probe steps: only when the run
    does not checkpoint anyway and the probes would add more than ``PROBE_MEMORY_SHARE`` of the
    denoising batch's activations (checkpointing every step would cost a second forward each)."""
    return not gradient_checkpointing and probe_samples > PROBE_MEMORY_SHARE * batch_size


def probe_samples_of(probes_per_step: int, signal: str) -> int:
    """UNet samples ``probes_per_step`` probes add to an active step: (u, c) at one timestep per
    probe, at both for the combined signal."""
    return int(probes_per_step) * (4 if signal == "combined" else 2)


def caption_latents(captions: Sequence[str], draw: Tensor | Sequence[int], draws: int, seed: int,
                    shape: Sequence[int]) -> Tensor:
    """(n, *shape) float32: for caption i, draw ``draw[i]`` of its ``draws`` fixed per-caption noises
    (the d-th N(0, I) latent of a generator seeded with ``prompt_seed(seed, caption)``)."""
    out = []
    for cap, d in zip(captions, [int(x) for x in draw]):
        gen = torch.Generator("cpu").manual_seed(prompt_seed(seed, cap))
        out.append(torch.randn((draws, *shape), generator=gen, dtype=torch.float32)[d])
    return torch.stack(out) if out else torch.zeros(0, *shape)


class FixedNoise(Protocol):
    """Per-caption fixed noise (a base-value cache): ``draws`` noises per caption, seeded by ``seed``."""

    draws: int
    seed: int


@dataclass
class ProbeBatch:
    latents: Tensor      # (k, C, H, W) float32 pure noise
    sample: Tensor       # UNet inputs to concatenate onto the denoising batch
    timesteps: Tensor
    embeds: Tensor
    index: Tensor        # rows of the batch whose captions were probed
    captions: list[str] | None = None   # the probed captions (when the batch's were given)
    keys: Tensor | None = None          # (k,) int64 keys of the probed rows (the gate's: image or caption keys)
    draw: Tensor | None = None          # fixed noise: which of each caption's draws the probe uses
    base: Tensor | None = None          # reference modes: (k,) base values on the same noise (0: population)
    known: Tensor | None = None         # reference modes: (k,) bool, a base value exists for the caption
    out: Tensor | None = None           # weight 0: the probes' no-grad UNet output, taken before the denoising
                                        # forward so its buffers are freed before the trained activations pile up

    @property
    def size(self) -> int:
        return self.sample.shape[0]


@dataclass
class ProbeResult:
    """One probe step's outcome, kept until the optimizer step's logs."""

    loss: Tensor         # unweighted penalty, scalar with grad
    weighted: Tensor     # weight * loss (after the force bound)
    values: Tensor       # (k,) probe values (score or g1*norm), detached
    norm: Tensor         # (k,) guidance norms, detached
    over: Tensor         # (k,) bool: over the threshold (the verdict)
    growth: Tensor | None = None     # reference modes: (k,) value - base value, detached (nan: no base)
    duplicated: Tensor | None = None # (k,) bool: the probed caption belongs to a duplicated image
    keys: Tensor | None = None       # caption keys of every process's probes, gathered for the gate/population
    force: float = 0.0               # guard.max_force: |penalty gradient| / |denoising gradient| at the UNet output


class ProbeSampler:
    """Schedule, noise and UNet inputs of the probes, and the calibration sample.

    ``signal``: combined | norm | align (:data:`~memreg.guards.anisotropy_gate.config.PROBE_SIGNALS`);
    ``grad_through="cond"`` detaches the unconditional predictions (shared by every caption). The
    generator is seeded per process, so DDP ranks probe different noise."""

    def __init__(self, scorer: AnisotropyScore, signal: str = "combined", probes_per_step: int = 2,
                 every_n_steps: int = 8, warmup_steps: int = 0, grad_through: str = "both",
                 calibration_prompts: int = 64, calibration_seeds: int = 2, seed: int = 0, process_index: int = 0):
        self.scorer = scorer
        self.signal = signal
        self.grad_through = grad_through
        self.probes_per_step = int(probes_per_step)
        self.every_n_steps = int(every_n_steps)
        self.warmup_steps = int(warmup_steps)
        self.calibration_prompts = int(calibration_prompts)
        self.calibration_seeds = int(calibration_seeds)
        self.seed = int(seed)
        self.generator = torch.Generator("cpu").manual_seed(self.seed + 1_000_003 * int(process_index))

    @classmethod
    def from_config(cls, cfg, scorer: AnisotropyScore, seed: int, process_index: int,
                    batch_size: int = 1) -> "ProbeSampler":
        """From a validated :class:`~memreg.guards.anisotropy_gate.config.AnisotropyGateConfig`;
        ``batch_size``: the denoising micro-batch, which ``every_n_steps: auto`` is resolved for."""
        every = resolve_every_n(cfg.every_n_steps, probe_samples_of(cfg.probes_per_step, cfg.signal), batch_size,
                                cfg.probe_share)
        return cls(scorer, signal=cfg.signal, probes_per_step=cfg.probes_per_step, every_n_steps=every,
                   warmup_steps=cfg.warmup_steps, grad_through=cfg.grad_through,
                   calibration_prompts=cfg.calibration_prompts, calibration_seeds=cfg.calibration_seeds, seed=seed,
                   process_index=process_index)

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based count of completed steps) carries probes."""
        return step >= self.warmup_steps and step % self.every_n_steps == 0

    @property
    def terms(self) -> str:
        """The half of the scorer's batch the probes run (``memreg.score.TERM_SETS``)."""
        return SIGNAL_TERMS[self.signal]

    @property
    def probe_samples(self) -> int:
        """UNet samples the probes add to an active step (:func:`probe_samples_of`)."""
        return probe_samples_of(self.probes_per_step, self.signal)

    def unet_inputs(self, latents: Tensor, cond: Tensor, uncond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.scorer.unet_inputs(latents, cond, uncond, self.terms)

    def values_from_output(self, out: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(values, norm) per probe from the UNet output on :meth:`unet_inputs`; fp32, differentiable
        (through the conditional predictions only for ``grad_through="cond"``)."""
        if self.grad_through == "cond":
            out = self.scorer.detach_unconditional(out, self.terms)
        return self.values_norms(self.scorer.from_unet_output(out, latents, self.terms))

    def values_norms(self, so: ScoreOutput) -> tuple[Tensor, Tensor]:
        """Probe value (score over the probed terms) and guidance norm (t_lo's for signal align)."""
        return so.score, (so.norm_lo if self.signal == "align" else so.norm)

    def draw_latents(self, n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((n, *shape), generator=generator or self.generator, dtype=torch.float32)

    def prepare(self, embeds: Tensor, uncond: Tensor, latent_shape: Sequence[int], step: int,
                captions: Sequence[str] | None = None, fixed_noise: FixedNoise | None = None,
                row_keys: Tensor | None = None, sources: Sequence[str] | None = None,
                encode: Callable[[list[str]], Tensor] | None = None) -> ProbeBatch | None:
        """Probe inputs for this step (None when inactive); consumes only the sampler's generator.
        ``captions``: the batch's (None: unknown); ``fixed_noise``: draw each probe's noise from its
        caption's fixed noises instead of fresh (needs ``captions``); ``row_keys``: the batch rows'
        keys (default: their caption keys). ``sources``: the rows' dataset wordings; a probed row
        whose caption was augmented is probed with its source wording (encoded by ``encode``), the
        one the base-value cache holds, so its growth is measured against the base on that very
        wording; unchanged rows reuse the batch's embeddings."""
        if not self.active(step):
            return None
        b = embeds.shape[0]
        k = self.probes_per_step
        if k <= b:
            index = torch.randperm(b, generator=self.generator)[:k]
        else:
            index = torch.randint(b, (k,), generator=self.generator)
        probed = None if captions is None else [captions[int(i)] for i in index]
        cond = embeds[index.to(embeds.device)]
        if sources is not None and probed is not None:
            wanted = [sources[int(i)] for i in index]
            if wanted != probed:
                probed = wanted
                cond = encode(probed).to(device=embeds.device, dtype=embeds.dtype)
        draw = None
        if fixed_noise is None:
            latents = self.draw_latents(k, latent_shape)
        else:
            draw = torch.randint(fixed_noise.draws, (index.numel(),), generator=self.generator)
            latents = caption_latents(probed, draw, fixed_noise.draws, fixed_noise.seed, latent_shape)
        latents = latents.to(embeds.device)
        sample, t, e = self.unet_inputs(latents, cond, uncond.to(device=embeds.device, dtype=embeds.dtype))
        return ProbeBatch(latents=latents, sample=sample, timesteps=t, embeds=e, index=index, captions=probed,
                          keys=row_keys[index] if row_keys is not None else
                          None if probed is None else caption_keys(probed), draw=draw)

    @torch.no_grad()
    def score_sample(self, prompts: Sequence[str | Sequence[str]], encode: Callable[[list[str]], Tensor],
                     uncond: Tensor, latent_shape: Sequence[int], run_unet: Callable | None = None,
                     batch_size: int = 16) -> tuple[Tensor, Tensor]:
        """(values, norms) of ``calibration_prompts`` captions x ``calibration_seeds`` single noise draws.

        The captions and the noise come from a generator seeded with ``seed`` alone (the same on
        every process and on every call, so a later call re-scores the very same draws); the
        training RNG is never used. ``encode(list[str]) -> (n, L, D)``; ``run_unet(sample, t,
        embeds)`` defaults to the scorer's UNet.
        """
        gen = torch.Generator("cpu").manual_seed(self.seed)
        n = min(self.calibration_prompts, len(prompts))
        if n == 0:
            raise ValueError("calibration needs at least one training caption")
        order = torch.randperm(len(prompts), generator=gen)[:n].tolist()
        chosen = []
        for i in order:
            p = prompts[i]
            if not isinstance(p, str):
                p = p[int(torch.randint(len(p), (1,), generator=gen))]
            chosen.append(p)
        # per draw, one (n, C, H, W) block of noise, whatever the chunking
        noise = [self.draw_latents(n, latent_shape, generator=gen) for _ in range(self.calibration_seeds)]
        so = score_prompts(self.scorer, encode, uncond, chosen, lambda c, lo, d: noise[d][lo:lo + len(c)],
                           draws=range(self.calibration_seeds), batch_size=batch_size, terms=self.terms,
                           run_unet=run_unet)
        values, norms = self.values_norms(so)
        return values.reshape(-1), norms.reshape(-1)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
