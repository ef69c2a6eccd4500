"""Inference-time mitigation: adapt a memorized prompt's embedding before generating.

For each prompt (row of ``prompt_embeds`` c, with the empty prompt's embedding u) and a threshold τ:

* **score** (the anisotropy paper's rule, driven by memreg's own metric): the criterion is the
  anisotropy score ``g1·norm + g2·align`` (``memreg.score.AnisotropyScore``) on pure-noise latents
  x_T, averaged over ``draws`` draws. Step 0 scores the prompt; at or below τ the embedding is
  returned bit-identical. Otherwise AdamW (lr 0.1, at most 20 updates) descends the score w.r.t.
  the token embeddings on *fresh* noise draws each step, and the prompt stops once its score is at
  or below the stop threshold ``target`` (default τ) on ``stop_streak`` (2) evaluations in a row, or
  after ``max_steps`` updates. A target under τ (e.g. the 25th percentile of ordinary prompts,
  ``calibrate_thresholds``) moves a flagged prompt into the ordinary range instead of leaving it at
  the edge of the memorized one. Each evaluation is an estimate on new draws, so one alone can fall
  under the target by chance while the prompt still reaches its training image: two in a row are
  asked for. The step size and budget are set so that flagged prompts reach the target (Wen's 0.05
  and 10 updates left most descents above it, and those prompts kept copying: README, "Generate
  safely").
* **wen** (Wen et al., ICLR'24, ``aug_prompt`` of github.com/YuxinWenRick/diffusion_memorization):
  the criterion is ``||eps(x_T, t_1, c) - eps(x_T, t_1, u)||_2`` at the first DDIM timestep t_1
  of the generation, on the *generation's own* starting noise x_T (the same every iteration);
  AdamW (lr 0.05, 10 iterations) with early stop once the loss is at or below the target loss τ
  (one evaluation: the noise is fixed, so a value under τ is not chance).
  Differences from their code: the loss is per image (theirs is one norm over the
  ``num_images_per_prompt`` images of a prompt), v-prediction outputs are converted to eps, and
  BOS stays exactly fixed (theirs zeroes its gradient but lets AdamW's weight decay shrink it).
* **none**: the embeddings are returned as they are.

Both methods share one loop (``descend``): one UNet call per step for all prompts still running
(stopped prompts leave the batch), each prompt its own parameter in one AdamW (elementwise, so a
prompt's trajectory does not depend on the others'), and noise from a per-prompt CPU generator
seeded with that prompt's seed: results do not depend on batch composition or device.

Which positions move: every position except BOS (position 0), padding included, as in Wen et al.
BOS sees only itself under CLIP's causal mask, so its embedding is the same for every prompt and
for the empty prompt: moving it changes nothing about the prompt. The padding positions' hidden
states attend over the whole prompt, so they carry its content too, and SD's UNet cross-attends
to all 77 positions; freezing them would leave most of the memorized conditioning in place.
``move_padding=False`` (or an explicit ``learnable`` mask) restricts the descent to the prompt's
tokens and its EOS.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from memreg.families import cat_conditioning, embeds_of, family_of, with_embeds
from memreg.generation import build_pipeline, generate_from_embeds
from memreg.score import AnisotropyScore, ddim_timesteps, guidance_norm, make_scorer, pure_noise_latents, to_epsilon

MODES = ("none", "wen", "score")
CRITERIA = {"none": None, "wen": "wen_guidance_norm", "score": "anisotropy_score"}
# (max_steps, lr, stop_streak) of each mode's descent where the config leaves them unset: wen keeps
# Wen et al.'s published rule (10 iterations at lr 0.05, stop at the first loss at or below tau);
# score takes steps twice as large and twice as many and stops on two evaluations in a row at or
# below its target (module doc). ``none`` does not descend.
DESCENT_DEFAULTS = {"none": (0, None, 1), "wen": (10, 0.05, 1), "score": (20, 0.1, 2)}


@dataclass
class MitigationConfig:
    """Settings of one mitigation mode (see module doc).

    tau: threshold (score) or target loss (wen) that flags a prompt; ``calibrate_tau`` computes one.
    target: where a flagged prompt's descent stops (default ``tau``); must be <= tau.
    max_steps / lr / weight_decay: the AdamW descent. Weight decay: torch's default 0.01.
    stop_streak: evaluations in a row at or below the stop (``target``) after which a flagged
        prompt stops. Unset (None), max_steps, lr and stop_streak are the mode's ``DESCENT_DEFAULTS``
        (wen: Wen et al.'s 10 iterations at lr 0.05, streak 1; score: 20 at lr 0.1, streak 2), and
        ``check`` returns the config with them filled in.
    draws: pure-noise draws per prompt and step for the score. One draw is noisy: on a pilot of the
        demo's ``none`` fine-tune (τ = 95th percentile of held-out captions) 1 draw flagged 4 of 8
        duplicated captions, 4 draws flagged 8 of 8, both flagging <= 5% of other held-out captions.
    preset / g1 / g2 / t_hi / t_lo: the scorer (default: the paper's preset for the model's
        prediction type; give g1 and g2 for fitted weights).
    num_inference_steps: the generation's DDIM steps (Wen's loss is at its first timestep).
    move_padding: whether padding positions may move (BOS never does).
    """

    mode: str = "score"
    tau: float | None = None
    target: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    stop_streak: int | None = None
    weight_decay: float = 0.01
    draws: int = 4
    preset: str | None = None
    g1: float | None = None
    g2: float | None = None
    t_hi: int | None = None
    t_lo: int | None = None
    num_inference_steps: int = 20
    move_padding: bool = True

    def check(self) -> "MitigationConfig":
        """The validated config, with max_steps, lr and stop_streak that were left unset filled in
        from the mode's ``DESCENT_DEFAULTS`` (a copy: a config can be checked again for another mode)."""
        if self.mode not in MODES:
            raise ValueError(f"mitigation mode must be one of {MODES}, got {self.mode!r}")
        steps, lr, streak = DESCENT_DEFAULTS[self.mode]
        done = replace(self, max_steps=steps if self.max_steps is None else self.max_steps,
                       lr=lr if self.lr is None else self.lr,
                       stop_streak=streak if self.stop_streak is None else self.stop_streak)
        if done.max_steps < 0 or done.draws < 1 or done.num_inference_steps < 1 or done.stop_streak < 1:
            raise ValueError(f"need max_steps >= 0, draws >= 1, num_inference_steps >= 1, stop_streak >= 1; got "
                             f"{done.max_steps}, {done.draws}, {done.num_inference_steps}, {done.stop_streak}")
        if done.mode != "none" and not done.lr > 0:
            raise ValueError(f"lr must be > 0, got {done.lr}")
        if self.target is not None and self.tau is not None and self.target > self.tau:
            raise ValueError(f"target ({self.target}) must be <= tau ({self.tau}): a prompt stops below where it is flagged")
        if (self.g1 is None) != (self.g2 is None):
            raise ValueError("give both g1 and g2, or neither")
        return done

    @property
    def stop(self) -> float | None:
        """Where a flagged prompt's descent stops: ``target``, or ``tau`` where no target is set."""
        return self.tau if self.target is None else self.target


@dataclass
class MitigationRecord:
    """One prompt's outcome. ``score_before/after``: the mode's criterion (None for ``none``);
    ``steps``: AdamW updates applied; ``seconds``: its share of the mitigation wall time."""

    mode: str
    flagged: bool
    score_before: float | None
    score_after: float | None
    steps: int
    seconds: float
    tau: float | None
    criterion: str | None
    prompt: str | None = None
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MitigationResult:
    embeds: Tensor  # (B, L, D), dtype and device of the input
    records: list[MitigationRecord]


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


class ScoreObjective:
    """Anisotropy score of each running prompt on ``draws`` fresh pure-noise draws from its generator."""

    def __init__(self, scorer: AnisotropyScore, uncond: Tensor, seeds: Sequence[int], draws: int = 1,
                 latent_size: tuple[int, int] | None = None):
        self.scorer, self.uncond, self.draws = scorer, uncond[:1], draws
        self.gens = _generators(seeds)
        self.hw = latent_size or (None, None)

    def __call__(self, embeds: Tensor, rows: list[int]) -> Tensor:
        unet = self.scorer.unet
        x = torch.cat([pure_noise_latents(unet, self.draws, self.gens[i], height=self.hw[0], width=self.hw[1])
                       for i in rows])
        out = self.scorer(x, embeds.repeat_interleave(self.draws, dim=0), self.uncond.to(embeds))
        return out.score.view(len(rows), self.draws).mean(dim=1)


class WenObjective:
    """Wen et al.'s loss ||eps_c - eps_u|| at the generation's first DDIM timestep, on each prompt's
    generation starting noise (drawn from its seed exactly as ``memreg.generation`` does)."""

    def __init__(self, scorer: AnisotropyScore, scheduler, uncond: Tensor, seeds: Sequence[int],
                 num_inference_steps: int, latent_size: tuple[int, int] | None = None):
        h, w = latent_size or (None, None)
        self.scorer, self.uncond = scorer, uncond[:1]
        self.t = ddim_timesteps(scheduler.config, num_inference_steps)[0]
        sigma = float(DDIMScheduler.from_config(scheduler.config).init_noise_sigma)
        self.latents = [pure_noise_latents(scorer.unet, 1, g, height=h, width=w) * sigma for g in _generators(seeds)]

    def __call__(self, embeds: Tensor, rows: list[int]) -> Tensor:
        sc, n = self.scorer, len(rows)
        x = torch.cat([self.latents[i] for i in rows])
        t = torch.full((2 * n,), self.t, device=x.device, dtype=torch.long)
        out = sc.run_unet(torch.cat([x, x]), t, cat_conditioning([self.uncond.to(embeds).expand(n, -1, -1), embeds])).float()
        ab = sc.alphas_cumprod[self.t].to(device=x.device, dtype=torch.float32).expand(n)
        eps_u, eps_c = (to_epsilon(o, x, ab, sc.prediction_type) for o in out.chunk(2))
        return guidance_norm(eps_c - eps_u)


def make_objective(unet, scheduler, uncond: Tensor, seeds: Sequence[int], config: MitigationConfig,
                   latent_size: tuple[int, int] | None = None):
    """The criterion of ``config.mode`` as a callable ``(embeds (A, L, D), rows) -> (A,)`` values."""
    scorer = make_scorer(unet, scheduler, preset=config.preset, g1=config.g1, g2=config.g2, t_hi=config.t_hi,
                         t_lo=config.t_lo)
    if config.mode == "score":
        return ScoreObjective(scorer, uncond, seeds, config.draws, latent_size)
    if config.mode == "wen":
        return WenObjective(scorer, scheduler, uncond, seeds, config.num_inference_steps, latent_size)
    raise ValueError(f"mode {config.mode!r} has no criterion")


def default_learnable(cond: Tensor, lengths: Sequence[int] | None = None) -> Tensor:
    """(B, L) bool: every position but BOS, or (with ``lengths``, tokens incl. BOS and EOS) the
    prompt's tokens and EOS only."""
    b, n = cond.shape[:2]
    pos = torch.arange(n).expand(b, n)
    if lengths is None:
        return pos >= 1
    return (pos >= 1) & (pos < torch.as_tensor(list(lengths)).view(b, 1))


@torch.no_grad()
def criterion_values(unet, scheduler, cond: Tensor, uncond: Tensor, seeds: Sequence[int],
                     config: MitigationConfig, latent_size: tuple[int, int] | None = None) -> Tensor:
    """Step-0 criterion of each row (what decides ``flagged``); float32 (B,) on the CPU."""
    objective = make_objective(unet, scheduler, uncond, seeds, config.check(), latent_size)
    return objective(cond.float(), list(range(cond.shape[0]))).float().cpu()


def mitigate_prompt_embeds(unet, scheduler, cond: Tensor, uncond: Tensor, seeds: Sequence[int] | None = None,
                           config: MitigationConfig | None = None, *, learnable: Tensor | None = None,
                           latent_size: tuple[int, int] | None = None,
                           prompts: Sequence[str] | None = None) -> MitigationResult:
    """Adapt the rows of ``cond`` (B, L, D) whose criterion exceeds ``config.tau`` (module doc).

    ``uncond``: (1, L, D) empty-prompt embedding. ``seeds``: one per row (default 0..B-1); the
    row's noise comes from a CPU generator with that seed. ``learnable``: (B, L) bool positions
    that may move (default ``default_learnable``; BOS is always kept). ``latent_size``: (h, w) of
    the noise latents (default the UNet's sample size). Returns the adapted embeddings (rows not
    flagged are bit-identical copies) and one record per row.
    """
    config = (config or MitigationConfig()).check()
    b = cond.shape[0]
    seeds = list(range(b)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != b or (prompts is not None and len(prompts) != b):
        raise ValueError(f"got {b} embeddings, {len(seeds)} seeds and {len(prompts or seeds)} prompts")
    if config.mode == "none":
        records = [MitigationRecord("none", False, None, None, 0, 0.0, None, None) for _ in range(b)]
        return MitigationResult(cond, _label(records, prompts, seeds))
    if config.tau is None:
        raise ValueError(f"mode {config.mode!r} needs a threshold tau (give one, or use calibrate_tau)")
    mask = default_learnable(cond) if learnable is None else learnable.bool().clone()
    mask[:, 0] = False
    objective = make_objective(unet, scheduler, uncond, seeds, config, latent_size)
    embeds, records = descend(objective, cond, mask.to(cond.device), config)
    return MitigationResult(embeds, _label(records, prompts, seeds))


def _label(records: list[MitigationRecord], prompts, seeds) -> list[MitigationRecord]:
    return [replace(r, prompt=None if prompts is None else prompts[i], seed=seeds[i]) for i, r in enumerate(records)]


def descend(objective, cond: Tensor, mask: Tensor,
            config: MitigationConfig) -> tuple[Tensor, list[MitigationRecord]]:
    """The loop both modes share (public so a criterion of one's own can use it): ``objective(embeds
    (A, L, D), rows) -> (A,)`` gives the values of the running rows. Step k evaluates the running
    prompts (one UNet call); a prompt at or below tau at step 0 is not flagged and stops; a flagged
    one stops once stop_streak evaluations in a row are at or below target, or at k == max_steps;
    the others take one AdamW step. ``config``: a checked MitigationConfig. The token embeddings
    move; a family's added conditioning (SDXL's pooled embedding and time ids) stays as encoded."""
    b, tau, stop = cond.shape[0], float(config.tau), float(config.stop)
    template, cond = cond, embeds_of(cond)
    base = cond.detach().float()
    params = [base[i:i + 1].clone().requires_grad_(True) for i in range(b)]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    before, after, steps, secs = [0.0] * b, [0.0] * b, [0] * b, [0.0] * b
    streak = [0] * b      # evaluations in a row at or below the stop
    active = list(range(b))
    for k in range(config.max_steps + 1):
        t0 = time.perf_counter()
        with torch.enable_grad():
            emb = torch.cat([torch.where(mask[i:i + 1, :, None], params[i], base[i:i + 1]) for i in active])
            values = objective(with_embeds(template[active], emb), active)
            vals = values.detach().float().cpu().tolist()
            for j, i in enumerate(active):
                streak[i] = streak[i] + 1 if k > 0 and vals[j] <= stop else 0
            keep = [j for j, i in enumerate(active)
                    if (vals[j] > tau if k == 0 else streak[i] < config.stop_streak) and k < config.max_steps]
            if keep:
                grads = torch.autograd.grad(values[keep].sum(), [params[active[j]] for j in keep])
        for j, i in enumerate(active):
            before[i] = vals[j] if k == 0 else before[i]
            after[i], steps[i] = vals[j], k
        for p in params:
            p.grad = None
        if keep:
            for j, g in zip(keep, grads):
                params[active[j]].grad = g
            opt.step()
        dt = time.perf_counter() - t0
        for i in active:
            secs[i] += dt / len(active)
        active = [active[j] for j in keep]
        if not active:
            break
    out = cond.detach().clone()
    records = []
    for i in range(b):
        flagged = before[i] > tau
        if flagged:
            out[i] = torch.where(mask[i, :, None], params[i].detach()[0], base[i]).to(cond.dtype)
        records.append(MitigationRecord(config.mode, flagged, before[i], after[i], steps[i], secs[i], tau,
                                        CRITERIA[config.mode]))
    return with_embeds(template, out), records


# --------------------------------------------------------------------------------------------
# diffusers pipelines
# --------------------------------------------------------------------------------------------

@dataclass
class PipelineMitigation:
    """``pipe(prompt_embeds=..., negative_prompt_embeds=...)`` inputs and one record per prompt."""

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor
    records: list[MitigationRecord]


def _latent_size(pipe, height: int | None, width: int | None) -> tuple[int, int] | None:
    if height is None and width is None:
        return None
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (height or size) // pipe.vae_scale_factor, (width or size) // pipe.vae_scale_factor


def encode_prompts(pipe, prompts: Sequence[str], height: int | None = None,
                   width: int | None = None) -> tuple[Tensor, Tensor]:
    """(prompt_embeds, negative_prompt_embeds) exactly as ``pipe(prompt=prompts)`` would encode them
    (the pipeline's own ``encode_prompt``: LoRA scale, textual inversion and all); for SDXL each a
    ``memreg.families.Conditioning`` with the pooled embeddings and the time ids of that size."""
    return family_of(pipe.unet, pipe.scheduler).encode_pipeline_prompts(pipe, prompts, height, width)


def token_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Tokens per prompt including BOS and EOS, truncated as the pipeline truncates."""
    ids = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [len(x) for x in ids]


def mitigate_pipeline_prompts(pipe, prompts: Sequence[str], seeds: Sequence[int],
                              config: MitigationConfig | None = None, height: int | None = None,
                              width: int | None = None) -> PipelineMitigation:
    """Encode ``prompts`` with ``pipe`` (a diffusers StableDiffusionPipeline, LoRA loaded or not)
    and mitigate them; pass the result to ``pipe(prompt_embeds=..., negative_prompt_embeds=...)``
    with latents from the same ``seeds`` (``memreg.generation.generate_from_embeds`` does)."""
    config = (config or MitigationConfig()).check()
    cond, neg = encode_prompts(pipe, prompts, height, width)
    learnable = None if config.move_padding else default_learnable(cond, token_lengths(pipe.tokenizer, prompts))
    res = mitigate_prompt_embeds(pipe.unet, pipe.scheduler, cond, neg[:1], seeds, config, learnable=learnable,
                                 latent_size=_latent_size(pipe, height, width), prompts=list(prompts))
    return PipelineMitigation(res.embeds, neg, res.records)


def calibrate_thresholds(pipe, prompts: Sequence[str], config: MitigationConfig | None = None,
                         quantiles: Sequence[float] = (0.95,), seeds: Sequence[int] | None = None,
                         batch_size: int = 16, height: int | None = None, width: int | None = None) -> list[float]:
    """The ``quantiles`` of the criterion of ``config.mode`` over ordinary (not memorized) ``prompts``,
    each on the noise of its seed (default 0..N-1), exactly as mitigation's step 0 measures it.
    τ at quantile q flags about a (1 - q) share of such prompts; a lower quantile (e.g. the median)
    is a stop ``target`` inside the ordinary range."""
    config = (config or MitigationConfig()).check()
    if not all(0 <= q <= 1 for q in quantiles):
        raise ValueError(f"quantiles must be in [0, 1], got {list(quantiles)}")
    if not prompts:
        raise ValueError("calibrating a threshold needs at least one ordinary prompt")
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    values = []
    for lo in range(0, len(prompts), batch_size):
        cond, neg = encode_prompts(pipe, prompts[lo:lo + batch_size], height, width)
        values.append(criterion_values(pipe.unet, pipe.scheduler, cond, neg[:1], seeds[lo:lo + batch_size], config,
                                       _latent_size(pipe, height, width)))
    values = torch.cat(values).double()
    return [float(torch.quantile(values, q)) for q in quantiles]


def calibrate_tau(pipe, prompts: Sequence[str], config: MitigationConfig | None = None, quantile: float = 0.95,
                  **kwargs) -> float:
    """τ for ``config.mode``: the ``quantile`` of the criterion over ordinary ``prompts``
    (``calibrate_thresholds``; same keyword arguments)."""
    return calibrate_thresholds(pipe, prompts, config, (quantile,), **kwargs)[0]


def calibrate_config(pipe, prompts: Sequence[str], config: MitigationConfig, flag_quantile: float = 0.98,
                     target_quantile: float = 0.25, **kwargs) -> MitigationConfig:
    """Set ``config.tau`` (the ``flag_quantile``) and, for ``score``, ``config.target`` (the
    ``target_quantile``) from ordinary ``prompts`` in one scoring pass (``calibrate_thresholds``;
    same keyword arguments). ``wen`` keeps its published rule: it stops at tau."""
    if config.mode == "score":
        config.tau, config.target = calibrate_thresholds(pipe, prompts, config, (flag_quantile, target_quantile),
                                                         **kwargs)
    else:
        config.tau, config.target = calibrate_thresholds(pipe, prompts, config, (flag_quantile,), **kwargs)[0], None
    return config


@dataclass
class MitigatedGeneration:
    images: list  # PIL RGB, one per (prompt, seed)
    records: list[MitigationRecord]
    mitigation_seconds: float
    generation_seconds: float


def generate_mitigated(components, prompts: Sequence[str], seeds: Sequence[int], mode: str | None = None,
                       config: MitigationConfig | None = None, *, unet=None, pipe=None, guidance_scale: float = 7.5,
                       batch_size: int = 8, height: int | None = None, width: int | None = None,
                       progress=None) -> MitigatedGeneration:
    """One image per (prompt, seed) with ``mode`` mitigation (``none`` | ``wen`` | ``score``), batched.

    ``components``: ``memreg.models.load_components(...)`` (``unet`` replaces its UNet, e.g. one
    with a LoRA active; or give a ready ``pipe``). ``config.tau`` is required for ``wen``/``score``
    (``calibrate_tau``); ``mode``, if given, overrides ``config.mode``; ``config.num_inference_steps`` is the
    generation's DDIM steps. Image i starts from the noise of ``seeds[i]`` in every mode, the same
    noise as ``memreg.generation.generate_images``. ``progress``: object with ``update(n)``.
    """
    config = config or MitigationConfig()
    config = (config if mode is None else replace(config, mode=mode)).check()
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    pipe = pipe if pipe is not None else build_pipeline(components, unet)
    images, records, t_mit, t_gen = [], [], 0.0, 0.0
    for lo in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[lo:lo + batch_size]), [int(s) for s in seeds[lo:lo + batch_size]]
        t0 = time.perf_counter()
        mit = mitigate_pipeline_prompts(pipe, chunk, chunk_seeds, config, height, width)
        t1 = time.perf_counter()
        images += generate_from_embeds(pipe, mit.prompt_embeds, mit.negative_prompt_embeds, chunk_seeds,
                                       num_inference_steps=config.num_inference_steps,
                                       guidance_scale=guidance_scale, height=height, width=width)
        t_mit, t_gen = t_mit + t1 - t0, t_gen + time.perf_counter() - t1
        records += mit.records
        if progress is not None:
            progress.update(len(chunk))
    return MitigatedGeneration(images, records, t_mit, t_gen)
