"""The guard protocol: what a training loop calls, and what a guard may ask of it.

One optimizer micro-step, seen from the loop (memreg's trainer or your own)::

    captions = guard.captions(captions)                  # may rewrite captions (caption noise)
    embeds = guard.embeds(encode(captions))              # may perturb the text embeddings
    extra = guard.extra_inputs(step, embeds, captions)   # UNet inputs to fuse into the forward, or None
    out = denoise(unet, *concat_inputs((noisy, timesteps, embeds), extra)).sample   # memreg.families.denoise
    model_pred, extra_out = split_output(out, bsz)
    per_sample = mse(model_pred, target).mean((1, 2, 3))  # (B,), with any SNR weighting
    result = guard.loss(GuardBatch(step, noisy, timesteps, embeds, model_pred, per_sample, extra_out,
                                   captions=captions))
    if result.loss is not None: result.loss.backward()   # None: every process skips this step

and once per optimizer step ``logs.update(guard.step_logs(logs))``. Before training
``guard.calibrate()`` (base model), after it ``guard.finish()``; ``state_dict``/``load_state_dict``
carry the guard through checkpoints. Everything a guard needs from the run comes in one
:class:`GuardContext`, so a guard never reaches into the loop and the loop has no per-guard code.
The batch's captions are passed to the hooks that use them (``extra_inputs``, ``GuardBatch``) rather
than remembered from ``captions()``, so no hook depends on another having been called first.

No-grad side forwards: ``ctx.run_unet`` (the current model, e.g. Wen's unconditional pass) and
``ctx.reference_unet()`` (the frozen base model: for LoRA the adapters disabled through
diffusers' ``disable_adapters``; full fine-tuning needs a frozen copy the trainer passes as
``ctx.reference``), for guards that compare a caption with its base-model self.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Collection, ContextManager, Iterable, Sequence

import torch
from torch import Tensor

from memreg.encoding import PromptEncoder
from memreg.families import cat_conditioning, denoise


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class GuardContext:
    """What a guard may use of the run. Defaults fit one process and a plain loop."""

    unet: Any                                   # the unwrapped UNet being trained
    noise_scheduler: Any
    # captions -> (n, L, D) text embeddings, or the family's memreg.families.Conditioning (SDXL: + added inputs)
    encode: Callable[[list[str]], Tensor]
    uncond: Callable[[], Tensor]                # () -> (1, L, D) empty-prompt conditioning (current text encoder)
    latent_shape: tuple[int, int, int]          # (C, H, W) of the training latents
    prediction_type: str | None = None          # None: the scheduler's
    tokenizer: Any = None
    seed: int = 0                               # the guard's own generators (never the training RNG)
    process_index: int = 0
    num_processes: int = 1
    batch_size: int = 16                        # chunk size of calibration passes
    weight_dtype: torch.dtype = torch.float32
    gradient_checkpointing: bool = False        # the run checkpoints activations anyway
    train_captions: Sequence = ()               # captions (str or list of str) for calibration
    calibration_batches: Callable[[int, torch.Generator], Iterable[dict]] | None = None
    gather: Callable[[Tensor], Tensor] = _identity        # concatenate a 1-D tensor over processes
    reduce_sum: Callable[[Tensor], Tensor] = _identity    # sum over processes
    broadcast: Callable[[Tensor], Tensor] = _identity     # process 0's value everywhere
    autocast: Callable[[], ContextManager] = nullcontext
    reference: Any = None                       # full fine-tuning: a frozen copy of the base UNet
    # captions whose image is duplicated in the data (selectivity logs), or a () -> them callable
    # evaluated on first use (e.g. memreg.guards.anisotropy_gate.reference.duplicated_captions over the records)
    duplicated_captions: Collection[str] | Callable[[], Collection[str]] = ()

    def __post_init__(self):
        if self.prediction_type is None:
            self.prediction_type = self.noise_scheduler.config.prediction_type

    @classmethod
    def for_models(cls, unet, noise_scheduler, tokenizer, text_encoder, latent_shape, encoder=None,
                   **kw) -> "GuardContext":
        """A context for your own loop: captions encoded as SD pipelines do (padded to the
        tokenizer's max length, last hidden state), or by ``encoder`` (another family's, e.g.
        ``memreg.families.prompt_encoder(components)`` for SDXL); ``kw``: any other field."""
        enc = encoder if encoder is not None else PromptEncoder(tokenizer, text_encoder)
        return cls(unet=unet, noise_scheduler=noise_scheduler, encode=lambda caps: enc(caps), uncond=enc.uncond,
                   latent_shape=tuple(latent_shape), tokenizer=tokenizer, **kw)

    def is_duplicated(self, captions: Sequence[str]) -> Tensor:
        """(n,) bool: which captions belong to a duplicated image (``duplicated_captions``)."""
        if callable(self.duplicated_captions):
            self.duplicated_captions = frozenset(self.duplicated_captions())
        dup = self.duplicated_captions
        return torch.tensor([c in dup for c in captions], dtype=torch.bool)

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def run_unet(self, sample: Tensor, timesteps: Tensor, embeds: Tensor, unet=None) -> Tensor:
        """A forward of ``unet`` (default: the trained UNet, unwrapped) in the weight dtype, under
        the run's autocast; grad as the caller has it."""
        unet = self.unet if unet is None else unet
        with self.autocast():
            return denoise(unet, sample.to(self.weight_dtype), timesteps, embeds.to(self.weight_dtype),
                           return_dict=False)[0]

    @property
    def has_base_model(self) -> bool:
        """Whether :meth:`reference_unet` can give the base model: a frozen copy, or LoRA adapters to disable."""
        return self.reference is not None or bool(getattr(self.unet, "peft_config", None))

    @contextmanager
    def reference_unet(self):
        """The base model, for no-grad reference forwards (see the module docstring)."""
        if self.reference is not None:
            yield self.reference
            return
        if not self.has_base_model:
            raise NotImplementedError("a base-model reference needs LoRA adapters or GuardContext.reference")
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()


@dataclass
class ExtraInputs:
    """UNet inputs a guard adds to the training forward (concatenated after the denoising batch)."""

    sample: Tensor
    timesteps: Tensor
    embeds: Tensor                # or a Conditioning (its added inputs travel with its rows)
    checkpointing: bool = False   # recompute activations in backward on this step (bounds peak memory)


@dataclass
class GuardBatch:
    """One micro-batch's training forward, as the guard sees it."""

    step: int                       # completed optimizer steps
    noisy: Tensor                   # (B, C, H, W) noisy latents
    timesteps: Tensor               # (B,)
    embeds: Tensor                  # (B, L, D) text embeddings the UNet saw
    model_pred: Tensor              # (B, C, H, W) the UNet's prediction (with grad)
    per_sample: Tensor              # (B,) denoising loss per sample (with grad), SNR-weighted if the run is
    extra_out: Tensor | None = None # the UNet output on the guard's ExtraInputs
    forward: Callable | None = None # forward(sample, t, embeds, checkpointing) through the trained (wrapped) UNet
    captions: Sequence[str] | None = None  # the batch's captions (as guard.captions returned them)
    items: Tensor | None = None     # (B,) int64 item keys: the training image (its duplicate cluster) of each row
    sources: Sequence[str] | None = None  # each row's dataset wording before caption augmentation (None: = captions)


@dataclass
class GuardLoss:
    loss: Tensor | None             # what to backward; None: skip (the guard makes processes agree)
    loss_mse: Tensor                # detached denoising loss for the logs (nan: nothing kept)


def concat_inputs(base: tuple[Tensor, Tensor, Tensor], extra: ExtraInputs | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(sample, timesteps, embeds)`` of the training batch with the guard's extra inputs appended
    (a family's added conditioning, e.g. SDXL's pooled embeddings and time ids, appended row for row)."""
    if extra is None:
        return base
    sample, t, embeds = base
    return (torch.cat([sample, extra.sample.to(sample.dtype)]), torch.cat([t, extra.timesteps.to(t.device)]),
            cat_conditioning([embeds, extra.embeds.to(embeds.dtype)]))


def split_output(out: Tensor, batch_size: int) -> tuple[Tensor, Tensor | None]:
    """(model_pred, extra_out) of a forward on :func:`concat_inputs`."""
    return out[:batch_size], (out[batch_size:] if out.shape[0] > batch_size else None)


def quantile(t: Tensor, q: float) -> float:
    return float(torch.quantile(t.double().cpu(), q)) if t.numel() else math.nan


class Guard:
    """Base class and protocol. Every hook has a neutral default, so a guard overrides only what it
    changes; ``name`` is its ``guard.type``, ``state_key`` keys its state in checkpoints (the name,
    unless a renamed guard keeps its old key so earlier checkpoints resume). Subclasses are built by
    :func:`memreg.guards.build_guard` through ``from_config(cfg, ctx)``."""

    name = "none"
    # step-log tags (memreg.log_tags) the training loop's progress bar shows beside the loss, when logged
    progress_keys: tuple[str, ...] = ()
    uses_items = False   # whether the trainer should pass each row's item key (extra_inputs/GuardBatch ``items``)

    @property
    def state_key(self) -> str:
        return self.name

    def __init__(self, ctx: GuardContext):
        self.ctx = ctx

    @classmethod
    def from_config(cls, cfg, ctx: GuardContext) -> "Guard":
        return cls(ctx)

    def describe(self) -> str:
        """One line for the training log."""
        return f"guard {self.name}"

    def calibrate(self) -> None:
        """Before the first step, on the base model (after a resume: only what the state lacks)."""

    def captions(self, captions: list[str]) -> list[str]:
        """The captions the batch trains on (a guard may rewrite them); stores nothing."""
        return captions

    def embeds(self, embeds: Tensor) -> Tensor:
        return embeds

    def extra_inputs(self, step: int, embeds: Tensor, captions: Sequence[str] | None,
                     items: Tensor | None = None, sources: Sequence[str] | None = None) -> ExtraInputs | None:
        """UNet inputs to fuse into this micro-step's forward (``captions``: the batch's, None if unknown;
        ``items``, ``sources``: see :class:`GuardBatch`)."""
        return None

    def loss(self, batch: GuardBatch) -> GuardLoss:
        loss = batch.per_sample.mean()
        return GuardLoss(loss=loss, loss_mse=loss.detach())

    def step_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Scalars for this optimizer step (``logs``: the loop's own, e.g. ``train/loss_mse``).
        Collectives allowed: every process calls this on every step."""
        return {}

    def finish(self) -> dict[str, float]:
        """After the last step; the returned scalars are logged as ``guard/<key>``."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoGuard(Guard):
    """``guard.type: none``: plain fine-tuning."""
