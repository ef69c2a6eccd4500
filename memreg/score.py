"""The anisotropy memorization score (arXiv 2601.20642) and Wen et al.'s baselines.

On pure-noise latents ``x_T`` and for a prompt embedding ``c`` (``u`` = empty prompt):

* norm  = ||eps(x_T, t_hi, c) - eps(x_T, t_hi, u)||_2 over C*H*W, at the noisiest timestep;
* align = mean over H*W of cos_C(eps(x_T, t_lo, u), eps(x_T, t_lo, c) - eps(x_T, t_lo, u)),
          a channel-axis cosine at each latent position, at a low-noise timestep on the same x_T;
* score = g1 * norm + g2 * align.

The four UNet evaluations run as one batch ``[u@t_hi, c@t_hi, u@t_lo, c@t_lo]`` (``terms="norm"``:
the ``t_hi`` half only; ``terms="align"``: the ``t_lo`` half only). Everything is differentiable, so
the same code serves detection (no_grad) and the training penalty. :func:`score_prompts` is the one
batched scoring loop over prompt lists and noise draws: ``memreg detect``, the training monitor's
``eval/*`` scalars and the penalty's calibration all call it, so they agree on the same prompts and
noise (:func:`noise_latents`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import Tensor

from memreg.families import cat_conditioning, denoise, family_of
from memreg.keys import text_key
from memreg.log_tags import SCORE_TERMS

# the paper's SD1.x and SD2.x weights; SDXL's is SD1.x's, not validated on real SDXL weights (memreg.families.sdxl)
PRESETS = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1), "sdxl": (1.0, 2.0)}
SPACES = ("eps", "score")
TERM_SETS = ("both", "norm", "align")     # which half of the 4-sample batch a caller runs
NOISE_MODES = ("shared", "per-prompt")


@dataclass
class ScoreOutput:
    """Per-sample terms, float32 tensors of shape (B,)."""

    norm: Tensor                     # nan where the t_hi half was not run (terms="align")
    align: Tensor                    # nan where the t_lo half was not run (terms="norm")
    score: Tensor                    # g1*norm + g2*align over the terms that were run
    norm_lo: Tensor | None = None    # guidance norm at t_lo (when the t_lo half was run)

    def detach(self) -> "ScoreOutput":
        return ScoreOutput(self.norm.detach(), self.align.detach(), self.score.detach(),
                           None if self.norm_lo is None else self.norm_lo.detach())


def ddim_timesteps(scheduler_config, num_inference_steps: int = 50) -> list[int]:
    """The timesteps of a DDIM sampling run for this scheduler config, noisiest first."""
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(num_inference_steps)
    return [int(t) for t in ddim.timesteps]


def default_timesteps(scheduler_config, num_inference_steps: int = 50) -> tuple[int, int]:
    """(t_hi, t_lo): first and third-to-last timestep of a 50-step DDIM run (981 and 41 for SD)."""
    ts = ddim_timesteps(scheduler_config, num_inference_steps)
    return ts[0], ts[-3]


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def to_epsilon(model_output: Tensor, sample: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """Convert a UNet output to the noise prediction eps. ``alpha_bar``: (B,) cumulative alphas."""
    if prediction_type == "epsilon":
        return model_output
    a = _bcast(alpha_bar, sample).sqrt()
    s = _bcast(1 - alpha_bar, sample).sqrt()
    if prediction_type == "v_prediction":
        return a * model_output + s * sample
    if prediction_type == "sample":
        return (sample - a * model_output) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def to_score_space(model_output: Tensor, sample: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """Score-space value the paper's released code uses for its SD2 (v-prediction) norm.

    For v-prediction this is ``(sqrt(a_bar) * v - x) / (1 - a_bar)`` exactly as in that code (it
    puts v where Tweedie's formula has the x0 estimate); for epsilon and sample prediction it is
    the true score ``-eps / sqrt(1 - a_bar)`` = ``(sqrt(a_bar) * x0 - x) / (1 - a_bar)``.
    """
    ab = _bcast(alpha_bar, sample)
    if prediction_type == "v_prediction":
        return (ab.sqrt() * model_output - sample) / (1 - ab)
    return -to_epsilon(model_output, sample, alpha_bar, prediction_type) / (1 - ab).sqrt()


def guidance_norm(guidance: Tensor) -> Tensor:
    """L2 norm of each sample's guidance over all non-batch axes, in float32."""
    return torch.linalg.vector_norm(guidance.float().flatten(1), dim=1)


def channel_alignment(eps_uncond: Tensor, guidance: Tensor) -> Tensor:
    """Channel-axis cosine between eps_uncond and the guidance at each position, averaged over H*W.

    Positions where either vector is exactly zero contribute 0 (so zero guidance gives align 0).
    """
    u, g = eps_uncond.float(), guidance.float()
    dot = (u * g).sum(dim=1)
    den = torch.linalg.vector_norm(u, dim=1) * torch.linalg.vector_norm(g, dim=1)
    nonzero = den > 0
    cos = torch.where(nonzero, dot / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(dot))
    return cos.flatten(1).mean(dim=1)


def pure_noise_latents(unet, batch_size: int, generator: torch.Generator | None = None,
                       device=None, height: int | None = None, width: int | None = None) -> Tensor:
    """Float32 N(0, I) latents of the UNet's input shape, drawn on the generator's device."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (batch_size, cfg.in_channels, height or size, width or size)
    gen_device = generator.device if generator is not None else "cpu"
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return x.to(device if device is not None else unet.device)


class AnisotropyScore:
    """Callable scorer: ``scorer(latents, cond_embeds, uncond_embeds) -> ScoreOutput``.

    Args:
        unet, scheduler: a diffusers UNet2DConditionModel and a scheduler with ``alphas_cumprod``.
        t_hi, t_lo: timesteps of the norm and alignment terms; default first and third-to-last
            of a 50-step DDIM schedule for this scheduler (981 and 41 for SD).
        g1, g2: weights of the norm and alignment terms (ignored if ``preset`` is given).
        preset: "sd1" (g1=1, g2=2) or "sd2" (g1=1, g2=0.1), the paper's weights; "sdxl" (1, 2),
            SD1.x's, not validated on real SDXL weights.
        prediction_type: overrides the scheduler's (epsilon, v_prediction or sample).
        space: where the norm term is taken.
            "eps": on eps predictions (v/sample outputs converted first); the paper's definition,
                which reproduces its SD1.x results.
            "score": on score-space differences as in the paper's released SD2 code (see
                ``to_score_space``); use it to reproduce its SD2.x numbers.
            The alignment term is always taken on eps.
        chunk_size: split the 4B-sample UNet batch into chunks of this many samples (bounds memory).
    """

    def __init__(self, unet, scheduler, t_hi: int | None = None, t_lo: int | None = None,
                 g1: float = 1.0, g2: float = 2.0, prediction_type: str | None = None,
                 preset: str | None = None, space: str = "eps", chunk_size: int | None = None):
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
            g1, g2 = PRESETS[preset]
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        d_hi, d_lo = default_timesteps(scheduler.config)
        self.t_hi = int(d_hi if t_hi is None else t_hi)
        self.t_lo = int(d_lo if t_lo is None else t_lo)
        n_train = scheduler.config.num_train_timesteps
        for name, t in (("t_hi", self.t_hi), ("t_lo", self.t_lo)):
            if not 0 <= t < n_train:
                raise ValueError(f"{name}={t} is outside the scheduler's [0, {n_train}) timesteps")
        self.unet = unet
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float64)
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        self.g1, self.g2 = float(g1), float(g2)
        self.space = space
        self.chunk_size = chunk_size

    def unet_inputs(self, latents: Tensor, cond_embeds: Tensor, uncond_embeds: Tensor, terms: str = "both"):
        """The (4B) batch ``[u@t_hi, c@t_hi, u@t_lo, c@t_lo]``: (sample, timesteps, embeddings).

        ``terms="norm"`` / ``"align"``: only the ``t_hi`` / ``t_lo`` half (2B). Exposed so the
        training penalty can concatenate it onto its own denoising batch.
        """
        if terms not in TERM_SETS:
            raise ValueError(f"terms must be one of {TERM_SETS}, got {terms!r}")
        b = latents.shape[0]
        if cond_embeds.shape[0] != b:
            raise ValueError(f"cond_embeds has batch {cond_embeds.shape[0]}, latents have {b}")
        uncond = uncond_embeds.expand(b, *uncond_embeds.shape[1:]) if uncond_embeds.shape[0] == 1 else uncond_embeds
        if uncond.shape != cond_embeds.shape:
            raise ValueError(f"uncond_embeds {tuple(uncond_embeds.shape)} does not broadcast to {tuple(cond_embeds.shape)}")
        halves = {"norm": [self.t_hi], "align": [self.t_lo], "both": [self.t_hi, self.t_lo]}[terms]
        sample = latents.repeat(2 * len(halves), 1, 1, 1)
        t = torch.tensor([tt for tt in halves for _ in range(2 * b)], device=latents.device, dtype=torch.long)
        embeds = cat_conditioning([uncond, cond_embeds] * len(halves))   # added conditioning batched with it
        return sample, t, embeds

    @staticmethod
    def detach_unconditional(model_output: Tensor, terms: str = "both") -> Tensor:
        """``model_output`` of :meth:`unet_inputs` with its unconditional rows detached, so a loss
        on the score moves only the conditional predictions (the ``u`` rows are shared by every
        caption; a penalty pulling them toward one caption would change every caption's guidance)."""
        parts = list(model_output.chunk(4 if terms == "both" else 2))
        return torch.cat([p.detach() if i % 2 == 0 else p for i, p in enumerate(parts)])

    def from_unet_output(self, model_output: Tensor, latents: Tensor, terms: str = "both") -> ScoreOutput:
        """Score terms from the UNet's output on ``unet_inputs(latents, ..., terms)``; fp32 math."""
        out = model_output.float()
        x = latents.float()
        parts = out.chunk(4 if terms == "both" else 2)
        nan = torch.full((x.shape[0],), float("nan"), device=x.device)
        norm, align, norm_lo, score = nan, nan, None, torch.zeros_like(nan)
        if terms in ("both", "norm"):
            u_hi, c_hi = parts[0], parts[1]
            ab_hi = self._alpha_bar(self.t_hi, x)
            conv = to_epsilon if self.space == "eps" else to_score_space
            norm = guidance_norm(conv(c_hi, x, ab_hi, self.prediction_type) - conv(u_hi, x, ab_hi, self.prediction_type))
            score = score + self.g1 * norm
        if terms in ("both", "align"):
            u_lo, c_lo = parts[-2], parts[-1]
            ab_lo = self._alpha_bar(self.t_lo, x)
            eps_u_lo = to_epsilon(u_lo, x, ab_lo, self.prediction_type)
            guidance = to_epsilon(c_lo, x, ab_lo, self.prediction_type) - eps_u_lo
            align = channel_alignment(eps_u_lo, guidance)
            norm_lo = guidance_norm(guidance)
            score = score + self.g2 * align
        return ScoreOutput(norm=norm, align=align, score=score, norm_lo=norm_lo)

    def __call__(self, latents: Tensor, cond_embeds: Tensor, uncond_embeds: Tensor) -> ScoreOutput:
        sample, t, embeds = self.unet_inputs(latents, cond_embeds, uncond_embeds)
        return self.from_unet_output(self.run_unet(sample, t, embeds), latents)

    def run_unet(self, sample: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
        """One UNet call (or ``chunk_size`` pieces) in the UNet's dtype."""
        dtype = self.unet.dtype
        n = sample.shape[0]
        step = self.chunk_size or n
        outs = [denoise(self.unet, sample[i:i + step].to(dtype), timesteps[i:i + step], embeds[i:i + step].to(dtype)).sample
                for i in range(0, n, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _alpha_bar(self, t: int, like: Tensor) -> Tensor:
        return self.alphas_cumprod[t].to(device=like.device, dtype=torch.float32).expand(like.shape[0])


def default_preset(prediction_type: str | None) -> str:
    """The paper's weights for a model: ``sd2`` for v-prediction (SD 2.x), ``sd1`` otherwise."""
    return "sd2" if prediction_type == "v_prediction" else "sd1"


def make_scorer(unet, scheduler, *, preset: str | None = None, g1: float | None = None, g2: float | None = None,
                t_hi: int | None = None, t_lo: int | None = None, prediction_type: str | None = None,
                space: str = "eps") -> AnisotropyScore:
    """The scorer for this model, by the one weight rule every caller uses: ``preset`` if given, else
    ``g1``/``g2`` if both are given, else the model family's default (``memreg.families``: SD 1.x and
    epsilon SD 2.x ``sd1``, v-prediction SD 2.x ``sd2`` as :func:`default_preset`, SDXL ``sdxl``)."""
    pt = prediction_type or scheduler.config.prediction_type
    if preset is None and (g1 is None or g2 is None):
        preset = family_of(unet, prediction_type=pt).default_preset(pt)
    if preset is not None:
        return AnisotropyScore(unet, scheduler, t_hi=t_hi, t_lo=t_lo, preset=preset, prediction_type=pt, space=space)
    return AnisotropyScore(unet, scheduler, t_hi=t_hi, t_lo=t_lo, g1=g1, g2=g2, prediction_type=pt, space=space)


def prompt_seed(seed: int, prompt: str) -> int:
    """A 63-bit generator seed from (noise seed, prompt text): :func:`memreg.keys.text_key`."""
    return text_key(prompt, seed)


def noise_latents(unet, prompts: Sequence[str], seed: int, noise: str = "shared", device=None) -> Tensor:
    """Float32 x_T of shape (len(prompts), C, H, W) for noise seed ``seed``, drawn on the CPU.

    ``"shared"`` (the paper's released code): one x_T per seed for every prompt; ``"per-prompt"``:
    each prompt its own x_T from a generator seeded by (seed, the prompt text). Either way a
    prompt's noise depends only on (prompt, seed), never on batch size, order or device.
    """
    if noise == "shared":
        x = pure_noise_latents(unet, 1, torch.Generator().manual_seed(int(seed)), device=device)
        return x.expand(len(prompts), *x.shape[1:])
    if noise == "per-prompt":
        return torch.cat([pure_noise_latents(unet, 1, torch.Generator().manual_seed(prompt_seed(seed, p)), device=device)
                          for p in prompts])
    raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")


def _score_shared(scorer: AnisotropyScore, run_unet, x: Tensor, cond: Tensor, uncond: Tensor, cache: dict, key):
    """``scorer`` on a batch whose x_T rows are all equal: the two unconditional outputs are the
    same for every prompt, so they are computed once per ``key`` (noise draw) and reused."""
    b = cond.shape[0]
    if key not in cache:
        x1 = x[:1]
        t = torch.tensor([scorer.t_hi, scorer.t_lo], device=x.device, dtype=torch.long)
        cache[key] = run_unet(torch.cat([x1, x1]), t, cat_conditioning([uncond[:1], uncond[:1]]))
    out_u = cache[key]
    t = torch.tensor([scorer.t_hi] * b + [scorer.t_lo] * b, device=x.device, dtype=torch.long)
    c_hi, c_lo = run_unet(torch.cat([x, x]), t, cat_conditioning([cond, cond])).chunk(2)
    u_hi = out_u[0:1].expand(b, *out_u.shape[1:])
    u_lo = out_u[1:2].expand(b, *out_u.shape[1:])
    return scorer.from_unet_output(torch.cat([u_hi, c_hi, u_lo, c_lo]), x)


@torch.no_grad()
def score_prompts(scorer: AnisotropyScore, encode: Callable[[list[str]], Tensor], uncond: Tensor,
                  prompts: Sequence[str], noise: Callable[[list[str], int, int], Tensor], *,
                  draws: Sequence[int] = (0,), batch_size: int = 16, terms: str = "both",
                  run_unet: Callable | None = None, shared_noise: bool = False,
                  on_batch: Callable | None = None) -> ScoreOutput:
    """Score ``prompts`` in batches on every noise draw; terms of shape (len(draws), len(prompts)).

    ``encode(list[str]) -> (n, L, D)`` runs once per batch; ``noise(batch_prompts, start, draw)``
    gives that batch's float32 x_T for ``draw`` (e.g. :func:`noise_latents`); ``run_unet(sample,
    t, embeds)`` defaults to ``scorer.run_unet``. ``shared_noise=True`` (the caller's noise gives
    every prompt of a draw the same x_T, ``terms="both"``): the unconditional half is computed
    once per draw and each batch needs a 2B-sample UNet call (same numbers up to rounding).
    ``on_batch(start, draw, x, cond, out)`` is called after each scored batch (progress, extras).
    Callers average over draws (detect, monitor) or keep single draws (penalty calibration).
    """
    draws = list(draws)
    if not draws:
        raise ValueError("need at least one noise draw")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shared_noise and terms != "both":
        raise ValueError("shared_noise needs terms='both'")
    run_unet = run_unet or scorer.run_unet
    cache: dict = {}
    rows: dict[str, list[list[Tensor]]] = {k: [[] for _ in draws] for k in ("norm", "align", "score", "norm_lo")}
    for lo in range(0, len(prompts), batch_size):
        batch = list(prompts[lo:lo + batch_size])
        cond = encode(batch)
        u = uncond.to(device=cond.device, dtype=cond.dtype)
        for i, d in enumerate(draws):
            x = noise(batch, lo, d).to(cond.device)
            if shared_noise:
                out = _score_shared(scorer, run_unet, x, cond, u, cache, d)
            else:
                out = scorer.from_unet_output(run_unet(*scorer.unet_inputs(x, cond, u, terms)), x, terms)
            for k in rows:
                v = getattr(out, k)
                rows[k][i].append((v if v is not None else torch.full_like(out.score, float("nan"))).float().cpu())
            if on_batch is not None:
                on_batch(lo, d, x, cond, out)
    if not prompts:
        return ScoreOutput(*(torch.zeros(len(draws), 0) for _ in range(4)))
    stacked = {k: torch.stack([torch.cat(r) for r in v]) for k, v in rows.items()}
    return ScoreOutput(**stacked)


def mean_scores(scorer: AnisotropyScore, encoder, prompts: Sequence[str], seeds: Sequence[int], *,
                noise: str = "shared", batch_size: int = 16, share_uncond: bool = True,
                encode: Callable[[list[str]], Tensor] | None = None,
                on_batch: Callable | None = None) -> dict[str, np.ndarray]:
    """``{term: (len(prompts),) float64}``: each of ``SCORE_TERMS`` averaged over the noise seeds.

    The one prompt-list scorer of detect, the monitor, the audit and the guard's report: prompts
    encoded by ``encoder`` (``encode(texts)`` / ``uncond()``, a :class:`memreg.encoding.PromptEncoder`;
    ``encode`` overrides its ``encode(texts).embeds``), x_T from :func:`noise_latents` (so a prompt's
    value depends on (prompt, seeds) only), batches through :func:`score_prompts`; ``share_uncond``
    computes the unconditional half once per seed when the noise is shared.
    """
    unet = scorer.unet
    device = next(unet.parameters()).device
    encode = encode or (lambda texts: encoder.encode(texts).embeds)
    out = score_prompts(scorer, lambda texts: encode(texts).to(device), encoder.uncond().to(device), list(prompts),
                        lambda texts, lo, seed: noise_latents(unet, texts, seed, noise, device=device),
                        draws=[int(s) for s in seeds], batch_size=batch_size,
                        shared_noise=noise == "shared" and share_uncond, on_batch=on_batch)
    return {t: getattr(out, t).double().mean(dim=0).numpy() for t in SCORE_TERMS}


@torch.no_grad()
def wen_multistep_norm(unet, scheduler, latents: Tensor, cond_embeds: Tensor, uncond_embeds: Tensor,
                       steps: int = 1, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                       prediction_type: str | None = None) -> Tensor:
    """Wen et al. (ICLR'24): mean over the first ``steps`` DDIM steps of ||eps_c - eps_u||.

    A CFG DDIM run from ``latents`` (pure noise); ``steps=1`` is their single-step detector, the
    norm term at t_hi alone. Returns float32 (B,).
    """
    prediction_type = prediction_type or scheduler.config.prediction_type
    ddim = DDIMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    ddim.set_timesteps(num_inference_steps, device=latents.device)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
    b = latents.shape[0]
    uncond = uncond_embeds.expand(b, *uncond_embeds.shape[1:]) if uncond_embeds.shape[0] == 1 else uncond_embeds
    embeds = cat_conditioning([uncond, cond_embeds]).to(unet.dtype)
    x = latents.float() * ddim.init_noise_sigma
    total = torch.zeros(b, device=latents.device)
    for t in ddim.timesteps[:steps]:
        out = denoise(unet, torch.cat([x, x]).to(unet.dtype), t, embeds).sample.float()
        out_u, out_c = out.chunk(2)
        ab = alphas_cumprod[int(t)].expand(b)
        diff = to_epsilon(out_c, x, ab, prediction_type) - to_epsilon(out_u, x, ab, prediction_type)
        total += guidance_norm(diff)
        guided = out_u + guidance_scale * (out_c - out_u)
        x = ddim.step(guided, t, x).prev_sample
    return total / steps
