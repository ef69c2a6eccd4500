"""The training loop: diffusers' text-to-image(-LoRA) recipe plus the memorization guard.

``train(cfg)`` runs one config end to end: early checks (output dir, model, prediction type,
data) -> accelerate setup -> models -> data -> guard -> optimizer/scheduler -> resume -> guard
calibration -> loop -> outputs. It works the same single-process and under
``accelerate launch --num_processes N`` (DDP; the penalty's probes ride in the one forward per
backward that DDP expects).

The guard (``cfg.guard.type``) is a :class:`memreg.guards.Guard` built by
:func:`memreg.guards.build_guard`; the loop calls only its protocol (captions/embeds, extra UNet
inputs fused into the one forward, loss, step logs, calibration, finish, state), never a guard by
name. ``_train`` wires the pieces: data -> models -> loader -> guard -> prepare -> resume ->
calibration -> monitor -> ``_loop`` (``_accumulate`` per micro-batch, ``_end_of_step`` per
optimizer step) -> ``_finish``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, broadcast, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from memreg import log_tags as tags
from memreg.duplicates import find_duplicates
from memreg.families import denoise, family_of, prompt_encoder
from memreg.guards import Guard, GuardBatch, GuardContext, build_guard, concat_inputs, split_output
from memreg.guards.anisotropy_gate.reference import duplicated_captions
from memreg.monitor import MemorizationMonitor
from memreg.training import checkpoint as ckpt
from memreg.training import data as data_mod
from memreg.training import finite
from memreg.training.config import TrainConfig, flat_dict, save_config
from memreg.training.item_clusters import build_item_index, cache_root
from memreg.training.metrics import StepTimer, peak_memory_mb
from memreg.training.output_dir import claim_output_dir
from memreg.training.setup import check_prediction_type, clip_trainable_grads, move_model, setup_models
from memreg.training.text_cache import TextEmbeddingCache

logger = logging.getLogger("memreg.train")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    logs: list[dict] = field(default_factory=list)      # one dict per optimizer step (main process)
    final_report: dict | None = None    # the guard's end-of-run report (penalty: ordinary conditioning)
    data_summary: Any = None
    guard: Guard | None = None          # the guard that ran (its state, calibration, final report)


def _resolve_seed(cfg: TrainConfig, accelerator) -> int:
    """The training seed (drawn on the main process and shared when not given) and the guard's."""
    if cfg.seed is None:
        drawn = [int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF]
        if accelerator.num_processes > 1:
            broadcast_object_list(drawn, from_process=0)
        cfg.seed = drawn[0]
        if accelerator.is_main_process:
            logger.info("seed not given; using %d (saved in config.yaml)", cfg.seed)
    if cfg.guard.seed is None:
        cfg.guard.seed = cfg.seed + 1
    return cfg.seed


def _setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    for name in ("memreg.train", "memreg.training", "memreg"):
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)


def _gather_cat(accelerator, t: torch.Tensor) -> torch.Tensor:
    return accelerator.gather(t.detach().contiguous()).reshape(-1)


def train(cfg: TrainConfig, meter=None) -> TrainResult:
    """Run ``cfg``. ``meter``: optional :class:`~memreg.training.metrics.SavedTensorMeter` wrapped
    around each micro-step's forward (benchmarks: activation memory on CPU, logged as
    ``perf/activation_mb``)."""
    # ------------------------------------------------------------------ early checks (no weights loaded)
    resuming = bool(cfg.resume_from_checkpoint)
    ckpt.check_output_dir(cfg.output_dir, resuming=resuming, overwrite=cfg.overwrite_output_dir)
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    resume_path = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, num_processes=num_processes,
                                      allow_incomplete=cfg.allow_incomplete_checkpoint)
    if resume_path is not None:
        ckpt.check_state_files(resume_path, num_processes)
    data_mod.check_data_source(cfg.train_data_dir, cfg.dataset_name, cfg.allow_external_files)
    model_prediction_type = check_prediction_type(cfg)

    logging_dir = Path(cfg.output_dir) / cfg.logging_dir
    report_to = None if cfg.report_to in (None, "", "none") else cfg.report_to
    # Under torchrun / `accelerate launch --multi_gpu` on a machine without GPUs, run DDP on CPU (gloo).
    # (accelerate 1.15's `launch --cpu` starts a single process unless given an MPI hostfile.)
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(logging_dir)),
    )
    _setup_logging(accelerator.is_main_process)
    lock = None
    try:
        lock = claim_output_dir(cfg.output_dir, accelerator, overwrite=cfg.overwrite_output_dir)
        seed = _resolve_seed(cfg, accelerator)
        return _train(cfg, accelerator, seed, resume_path, model_prediction_type, meter)
    finally:
        if lock is not None:
            lock.release()
        accelerator.end_training()
        if accelerator.num_processes == 1:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


@dataclass
class _Run:
    """What one run holds; built step by step by ``_train``'s helpers."""

    cfg: TrainConfig
    accelerator: Any
    models: Any
    data: Any
    encoder: Any                        # the family's prompt encoder (memreg.families.prompt_encoder)
    prediction_type: str
    meter: Any = None
    dataset: Any = None
    dataloader: Any = None
    sampler: Any = None                 # the raw loader's EpochSampler (shared by accelerate's wrappers)
    latent_shape: tuple = ()
    guard: Guard | None = None
    unet_p: Any = None
    te_p: Any = None
    trained_models: list = field(default_factory=list)
    optimizer: Any = None
    lr_scheduler: Any = None
    max_steps: int = 0
    per_epoch: int = 1
    num_epochs: int = 1
    global_step: int = 0
    first_epoch: int = 0
    skip_batches: int = 0
    text_cache: TextEmbeddingCache | None = None   # cache_text_embeddings > 0: the frozen encoder's outputs
    monitor: Any = None

    _records: list | None = field(default=None, init=False, repr=False)
    _dup_index: Any = field(default=None, init=False, repr=False)
    _item_keys: Any = field(default=None, init=False, repr=False)

    def train_records(self) -> list[dict]:
        """The training records (image, caption, id), built once for the guard and the monitor."""
        if self._records is None:
            self._records = self.data.records("train")
        return self._records

    def dup_index(self, collective: bool = False):
        """The run's one item index of the training images, shared by the guard and the monitor: the
        audit's clusters with ``eval.duplicates_from``, else ``eval.item_clusters`` (near-duplicate
        clusters or pixel hashes, :mod:`memreg.training.item_clusters`, cached). ``collective``: every
        process calls this together and hashes its share; otherwise this process builds it alone."""
        if self._dup_index is None:
            e, acc = self.cfg.eval, self.accelerator
            if e.duplicates_from:
                self._dup_index = find_duplicates(self.train_records(), clusters_from=e.duplicates_from)
            else:
                self._dup_index = build_item_index(
                    [self.data.refs[i] for i in self.data.train_idx], cache_root(e, self.cfg.output_dir),
                    kind=e.item_clusters, ids=self.data.train_idx, progress=acc.is_main_process,
                    rank=acc.process_index if collective else 0, world=acc.num_processes if collective else 1,
                    barrier=acc.wait_for_everyone if collective else None)
        return self._dup_index

    def item_keys(self) -> torch.Tensor:
        """(dataset rows,) int64: each training row's item key (``DuplicateIndex.item_keys``: its image or
        its audit cluster), indexed like the batches' ``index``; held-out rows 0 (never trained on)."""
        if self._item_keys is None:
            keys = torch.zeros(len(self.data.refs), dtype=torch.int64)
            ids = [r["id"] for r in self.train_records()]
            keys[ids] = torch.tensor(self.dup_index().item_keys(), dtype=torch.int64)
            self._item_keys = keys
        return self._item_keys

    @property
    def total_batch(self) -> int:
        c = self.cfg
        return c.train_batch_size * self.accelerator.num_processes * c.gradient_accumulation_steps

    def forward(self, sample, timesteps, embeds, checkpointing: bool = False) -> torch.Tensor:
        """The trained (wrapped) UNet; ``checkpointing``: recompute activations in backward this time."""
        unet = self.models.unet
        if checkpointing:
            unet.enable_gradient_checkpointing()
        try:
            return denoise(self.unet_p, sample, timesteps, embeds, return_dict=False)[0]
        finally:
            if checkpointing:
                unet.disable_gradient_checkpointing()


def _train(cfg, accelerator, seed, resume_path, model_prediction_type, meter=None) -> TrainResult:
    data = _load_data(cfg, accelerator, seed)   # data before weights: a bad dataset fails fast
    set_seed(seed, device_specific=True)
    models = setup_models(cfg, accelerator.device, accelerator.mixed_precision)
    run = _Run(cfg=cfg, accelerator=accelerator, models=models, data=data, prediction_type=model_prediction_type,
               meter=meter,
               encoder=prompt_encoder(models.components, accelerator.device, image_size=cfg.resolution))
    _build_loader(run, seed)
    run.guard = build_guard(cfg.guard, _guard_context(run))
    if cfg.eval.enabled or run.guard.uses_items:
        run.dup_index(collective=True)      # before the first step, on every process: the hashing is sharded
    if accelerator.is_main_process:
        logger.info("%s; batch %d", run.guard.describe(), cfg.train_batch_size)
    _prepare(run)
    _start_outputs(run)
    if resume_path is not None:
        _resume(run, resume_path)
    run.guard.calibrate()
    run.monitor = _build_monitor(run)
    _run_monitor(run, run.global_step, final=False)
    result = TrainResult(output_dir=Path(cfg.output_dir), global_step=run.global_step, data_summary=data.summary,
                         guard=run.guard)
    _loop(run, result)
    result.global_step = run.global_step
    stop = cfg.stop_at_step
    if stop is not None and stop <= run.global_step < run.max_steps:
        logger.info("stop_at_step=%d reached: stopping without final outputs (resume to finish)", stop)
        return result
    _finish(run, result)
    return result


def _load_data(cfg, accelerator, seed):
    with accelerator.main_process_first():
        data = data_mod.build_train_data(cfg, seed)
    if accelerator.is_main_process:
        s = data.summary
        logger.info("data: %d samples (%d train, %d held out, %d unreadable skipped)",
                    s.num_total, s.num_train, s.num_heldout, s.skipped)
    if not data.train_idx:
        raise data_mod.DataError("no training samples left after the held-out split")
    return data


def _build_loader(run: _Run, seed: int) -> None:
    cfg, m = run.cfg, run.models
    latent_cache = None
    if cfg.cache_latents:
        if not cfg.center_crop:
            logger.info("cache_latents: images are center-cropped (a random crop cannot be cached)")
        latent_cache = data_mod.build_latent_cache(run.data, m.vae, cfg.resolution, cfg.random_flip,
                                                   run.accelerator.device, m.weight_dtype)
    run.dataset = data_mod.TrainDataset(run.data, cfg.resolution, cfg.center_crop, cfg.random_flip, seed,
                                        latent_cache=latent_cache, proportion_empty_prompts=cfg.proportion_empty_prompts,
                                        augment=data_mod.caption_aug.from_train_config(cfg))
    run.dataloader = data_mod.make_dataloader(run.dataset, cfg.train_batch_size, cfg.dataloader_num_workers, seed)
    run.sampler = run.dataloader.sampler
    vae_scale = 2 ** (len(m.vae.config.block_out_channels) - 1)
    if cfg.resolution % vae_scale:
        raise data_mod.DataError(f"resolution={cfg.resolution} is not a multiple of the VAE factor {vae_scale}")
    run.latent_shape = (m.unet.config.in_channels, cfg.resolution // vae_scale, cfg.resolution // vae_scale)


def _guard_context(run: _Run) -> GuardContext:
    """The run as a guard sees it (no-grad forwards on the unwrapped UNet, collectives, data)."""
    acc, m, enc = run.accelerator, run.models, run.encoder

    def broadcast_cpu(t: torch.Tensor) -> torch.Tensor:
        return broadcast(t.to(acc.device), from_process=0).cpu()

    return GuardContext(
        unet=m.unet, noise_scheduler=m.noise_scheduler, prediction_type=run.prediction_type, tokenizer=m.tokenizer,
        encode=lambda caps: enc(caps), uncond=lambda: enc.uncond(fresh=m.train_text_encoder),
        latent_shape=run.latent_shape, seed=run.cfg.guard.seed, process_index=acc.process_index,
        num_processes=acc.num_processes, batch_size=run.cfg.train_batch_size, weight_dtype=m.weight_dtype,
        gradient_checkpointing=run.cfg.gradient_checkpointing, train_captions=run.data.train_captions(),
        calibration_batches=lambda n, gen: _calibration_batches(run, n, gen),
        gather=lambda t: _gather_cat(acc, t), reduce_sum=lambda t: acc.reduce(t.to(acc.device), reduction="sum"),
        broadcast=broadcast_cpu, autocast=acc.autocast, reference=m.reference,
        duplicated_captions=lambda: duplicated_captions(run.train_records(), run.cfg.eval.dup_min_count,
                                                        index=run.dup_index()))


def _fused_adam(params: list[torch.Tensor]) -> bool | None:
    """True where torch has a fused AdamW kernel for every parameter (floating point, on CPU or CUDA):
    on CPU torch's default is a loop over the tensors, 5x slower on the demo's UNet (README, "Where
    the time goes"). None (torch's own choice) otherwise."""
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def _prepare(run: _Run) -> None:
    """Optimizer, LR schedule, ``accelerator.prepare``, step counts and checkpoint hooks."""
    cfg, acc, m = run.cfg, run.accelerator, run.models
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr = lr * cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
    params = list(m.trainable_params)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=_fused_adam(params))
    per_epoch = math.ceil(len(run.dataloader) / acc.num_processes / cfg.gradient_accumulation_steps)
    run.max_steps = cfg.max_train_steps or cfg.num_train_epochs * max(per_epoch, 1)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
                                 num_training_steps=run.max_steps * acc.num_processes,
                                 num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    if m.train_text_encoder:
        run.unet_p, *tes, run.optimizer, run.dataloader, run.lr_scheduler = acc.prepare(
            m.unet, *m.text_encoders, optimizer, run.dataloader, lr_scheduler)
        run.te_p = tes[0] if len(tes) == 1 else tuple(tes)   # SDXL: the pair its encoder takes
        run.trained_models = [run.unet_p, *tes]
    else:
        run.unet_p, run.optimizer, run.dataloader, run.lr_scheduler = acc.prepare(
            m.unet, optimizer, run.dataloader, lr_scheduler)
        run.te_p = m.text_encoder if len(m.text_encoders) == 1 else tuple(m.text_encoders)
        run.trained_models = [run.unet_p]
        if cfg.cache_text_embeddings:
            run.text_cache = TextEmbeddingCache(lambda caps: run.encoder(caps, model=run.te_p),
                                                cfg.cache_text_embeddings)
    run.per_epoch = math.ceil(len(run.dataloader) / cfg.gradient_accumulation_steps)
    run.num_epochs = math.ceil(run.max_steps / run.per_epoch)
    ckpt.register_hooks(acc, cfg.mode, m.unet, m.text_encoder if m.train_text_encoder else None, m.ema,
                        {run.guard.state_key: run.guard},
                        text_encoder_2=m.text_encoder_2 if m.train_text_encoder else None,
                        family=family_of(m.components))


def _start_outputs(run: _Run) -> None:
    cfg, acc = run.cfg, run.accelerator
    if acc.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        if acc.log_with:
            acc.init_trackers(cfg.tracker_project_name, config=flat_dict(cfg))


def _resume(run: _Run, resume_path) -> None:
    run.accelerator.print(f"resuming from {resume_path}")
    run.accelerator.load_state(str(resume_path))
    run.global_step = ckpt.step_of(resume_path)
    run.first_epoch = run.global_step // run.per_epoch
    run.skip_batches = (run.global_step % run.per_epoch) * run.cfg.gradient_accumulation_steps


def _build_monitor(run: _Run):
    if not (run.cfg.eval.enabled and run.accelerator.is_main_process):
        return None
    m = run.models
    comps = dataclasses.replace(m.components, tokenizer=m.tokenizer, text_encoder=m.text_encoder, unet=m.unet,
                                vae=m.vae, scheduler=m.noise_scheduler, model=run.cfg.pretrained_model_name_or_path)
    return MemorizationMonitor(run.cfg.eval, components=comps, train_records=run.train_records(),
                               heldout_records=run.data.records("heldout"), accelerator=run.accelerator,
                               output_dir=run.cfg.output_dir, dup_index=run.dup_index())


def _run_monitor(run: _Run, step: int, final: bool) -> None:
    """The monitor on the EMA weights when there are any (restored after)."""
    if run.monitor is None:
        return
    ema, unet = run.models.ema, run.models.unet
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
        run.monitor.maybe_run(step, unet=run.accelerator.unwrap_model(run.unet_p), final=final)
    finally:
        if ema is not None:
            ema.restore(unet.parameters())


# ---------------------------------------------------------------------- the loop

def _epoch_batches(run: _Run, epoch: int):
    """The epoch's batches, skipping the ones a resumed run already trained on."""
    loader = run.dataloader
    loader.set_epoch(epoch)
    if epoch == run.first_epoch and run.skip_batches:
        loader = run.accelerator.skip_first_batches(run.dataloader, run.skip_batches)
        loader.set_epoch(epoch)
    run.sampler.set_epoch(epoch)  # the one EpochSampler all wrappers share
    return loader


def _loop(run: _Run, result: TrainResult) -> None:
    cfg, acc = run.cfg, run.accelerator
    if acc.is_main_process:
        logger.info("training: %d steps (%d epochs of %d), batch %d x %d processes x %d accumulation = %d, mode %s, "
                    "guard %s", run.max_steps, run.num_epochs, run.per_epoch, cfg.train_batch_size,
                    acc.num_processes, cfg.gradient_accumulation_steps, run.total_batch, cfg.mode, run.guard.name)
    progress = tqdm(range(run.max_steps), initial=run.global_step, desc="steps",
                    disable=not acc.is_local_main_process or bool(os.environ.get("TQDM_DISABLE")))
    timer = StepTimer(acc.device)
    timer.start()
    window = _Window()
    for epoch in range(run.first_epoch, run.num_epochs):
        if _done(run):
            break
        for batch in _epoch_batches(run, epoch):
            grad_norm = _accumulate(run, batch, window)
            if not acc.sync_gradients:
                continue
            _end_of_step(run, window, timer.lap(), grad_norm, result, progress)
            window = _Window()
            timer.start()
            if _done(run):
                break
    acc.wait_for_everyone()
    progress.close()


def _done(run: _Run) -> bool:
    stop = run.cfg.stop_at_step
    return run.global_step >= run.max_steps or (stop is not None and run.global_step >= stop)


def _accumulate(run: _Run, batch, window: "_Window") -> float | None:
    """One micro-batch: forward, guard, backward; the optimizer step when gradients sync."""
    acc, opt = run.accelerator, run.optimizer
    with acc.accumulate(*run.trained_models):
        if run.meter is not None:
            run.meter.reset()
        with run.meter if run.meter is not None else nullcontext():
            out = _micro_step(run, batch)
        window.add(out)
        if out.loss is not None:
            acc.backward(out.loss)
            window.backward = True
        elif window.backward:
            # Skipped micro-batch after others in this window: a zero backward keeps DDP in sync.
            acc.backward(out.zero)
        grad_norm = None
        if acc.sync_gradients and window.backward:
            grad_norm = clip_trainable_grads(acc, run.models.trainable_params, run.cfg.max_grad_norm)
        if acc.sync_gradients:
            _stop_if_nonfinite(run, window, grad_norm)
        if window.backward:
            opt.step()
            run.lr_scheduler.step()
            opt.zero_grad(set_to_none=True)
    return grad_norm


def _stop_if_nonfinite(run: _Run, window: "_Window", grad_norm: float | None) -> None:
    """Raise :class:`~memreg.training.finite.NonFiniteError` before the optimizer step when this step's
    losses or gradient norm are not finite, on every process at once (the counts are summed)."""
    acc = run.accelerator
    bad = finite.nonfinite_losses(o.loss for o in window.items)
    # fp16: the loss scaler overflows on purpose and skips that step itself (memreg.training.finite)
    norm_bad = grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None
    flags = torch.tensor([bad, int(norm_bad)], device=acc.device)
    if acc.num_processes > 1:
        flags = acc.reduce(flags, reduction="sum")
    if int(flags.sum()) == 0:
        return
    last = ckpt.latest_checkpoint_name(run.cfg.output_dir)
    raise finite.step_error(run.global_step + 1, run.cfg, int(flags[0]), grad_norm if norm_bad else None, last)


def _check_weights(run: _Run, what: str) -> None:
    """Refuse to write ``what`` (a checkpoint, the final weights) from weights holding NaN or infinity."""
    models = [run.models.unet] + (run.models.text_encoders if run.models.train_text_encoder else [])
    name = finite.first_nonfinite_param((n, p) for m in models for n, p in m.named_parameters() if p.requires_grad)
    if name is not None:
        raise finite.NonFiniteError(
            f"step {run.global_step}: parameter {name} holds non-finite values; {what} not written "
            f"(last good checkpoint: {ckpt.latest_checkpoint_name(run.cfg.output_dir) or 'none'}). "
            f"Likely cause: {finite.likely_cause(run.global_step, run.cfg)}")


def _end_of_step(run: _Run, window: "_Window", step_time: float, grad_norm, result: TrainResult, progress) -> None:
    """After an optimizer step (or one the guard skipped): EMA, logs, checkpoint, monitor."""
    acc, m = run.accelerator, run.models
    if m.ema is not None and window.backward:
        m.ema.step(m.unet.parameters())
    logs = window.summarize(acc)
    logs.update(run.guard.step_logs(logs))
    logs.update({tags.TRAIN_LR: run.lr_scheduler.get_last_lr()[0], tags.PERF_STEP_TIME: step_time,
                 tags.PERF_SAMPLES_PER_S: run.total_batch / step_time if step_time > 0 else math.nan,
                 tags.PERF_PEAK_MEM_MB: peak_memory_mb(acc.device)})
    if grad_norm is not None:
        logs[tags.TRAIN_GRAD_NORM] = grad_norm
    if run.meter is not None:
        logs[tags.PERF_ACTIVATION_MB] = run.meter.peak / 2**20
        run.meter.peak = 0
    run.global_step += 1
    progress.update(1)
    shown = (tags.TRAIN_LOSS_MSE, *run.guard.progress_keys)
    progress.set_postfix({k.split("/")[-1]: f"{logs[k]:.4g}" for k in shown if k in logs})
    acc.log(logs, step=run.global_step)
    if acc.is_main_process:
        result.logs.append(dict(logs, step=run.global_step))
    if run.global_step % run.cfg.checkpointing_steps == 0:
        _check_weights(run, f"checkpoint-{run.global_step}")
        _save_checkpoint(run.cfg, acc, run.global_step)
    _run_monitor(run, run.global_step, final=False)


def _finish(run: _Run, result: TrainResult) -> None:
    """The guard's end-of-run report, the trained weights, the monitor's final eval."""
    acc, cfg, m = run.accelerator, run.cfg, run.models
    _check_weights(run, "the final weights")
    report = run.guard.finish()
    if report:
        result.final_report = report
        acc.log({tags.guard_final(k): v for k, v in report.items()}, step=run.global_step)
    if acc.is_main_process:
        if cfg.mode == "full":
            if m.ema is not None:
                m.ema.copy_to(m.unet.parameters())
            for mod in (m.unet, *m.text_encoders, m.vae):
                move_model(mod, acc.device, torch.float32)

        def write(directory: Path) -> None:
            if cfg.mode == "lora":
                ckpt.save_lora(directory, m.unet, m.text_encoder if m.train_text_encoder else None,
                               text_encoder_2=m.text_encoder_2 if m.train_text_encoder else None,
                               family=family_of(m.components))
            else:
                ckpt.save_full_pipeline(directory, cfg.pretrained_model_name_or_path, m.unet, m.text_encoder, m.vae,
                                        m.tokenizer, revision=cfg.revision, variant=cfg.variant,
                                        components=m.components)
            save_config(cfg, directory / "config.yaml")

        written = ckpt.write_final_outputs(cfg.output_dir, write, run.global_step)
        logger.info("saved the final outputs to %s: %s", cfg.output_dir, ", ".join(written))
    _run_monitor(run, run.global_step, final=True)
    acc.wait_for_everyone()


# ---------------------------------------------------------------------- one micro-batch

@dataclass
class _MicroOut:
    loss: torch.Tensor | None                 # None: skip backward (the guard skipped this step everywhere)
    zero: torch.Tensor | None                 # a zero loss with graph, for DDP-sync on a skipped micro-batch
    loss_mse: torch.Tensor


def _randn_like(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``: from the device's RNG, or from the CPU generator ``gen``."""
    return torch.randn_like(x) if gen is None else torch.randn(x.shape, generator=gen).to(x)


def _noisy_latents(batch, m, noise_offset: float = 0.0, gen: torch.Generator | None = None):
    """``(latents, noise, timesteps, noisy latents)`` of a batch, in diffusers' order: sample the
    latents (VAE posterior of ``pixel_values``, or the cached ``latent_mean``/``latent_std``), draw the
    noise (plus ``noise_offset`` times per-channel noise), the timesteps, and noise the latents.

    ``gen`` None: every draw from the training RNG (the training step). A CPU generator: every draw
    from it (guard calibration), so the same seed gives the same batches on any device."""
    with torch.no_grad():
        if "pixel_values" in batch:
            dist = m.vae.encode(batch["pixel_values"].to(m.weight_dtype)).latent_dist
            mean, std = dist.mean, dist.std
        else:
            mean, std = batch["latent_mean"], batch["latent_std"]
        latents = (mean + std * _randn_like(mean, gen)) * m.vae.config.scaling_factor
    noise = _randn_like(latents, gen)
    if noise_offset:
        shape = (latents.shape[0], latents.shape[1], 1, 1)
        offset = (torch.randn(shape, device=latents.device, dtype=latents.dtype) if gen is None
                  else torch.randn(shape, generator=gen).to(latents))
        noise = noise + noise_offset * offset
    num_t, n = m.noise_scheduler.config.num_train_timesteps, latents.shape[0]
    if gen is None:
        timesteps = torch.randint(0, num_t, (n,), device=latents.device).long()
    else:
        timesteps = torch.randint(0, num_t, (n,), generator=gen).to(latents.device)
    return latents, noise, timesteps, m.noise_scheduler.add_noise(latents, noise, timesteps)


def _per_sample_loss(run: _Run, model_pred, target, timesteps) -> torch.Tensor:
    """MSE per sample, Min-SNR-gamma weighted when ``snr_gamma`` is set (diffusers' recipe)."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    gamma = run.cfg.snr_gamma
    if gamma is not None:
        snr = compute_snr(run.models.noise_scheduler, timesteps)
        w = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        w = w / snr if run.prediction_type == "epsilon" else w / (snr + 1)
        per_sample = per_sample * w
    return per_sample


def _micro_step(run: _Run, batch) -> _MicroOut:
    m, guard, step = run.models, run.guard, run.global_step
    latents, noise, timesteps, noisy = _noisy_latents(batch, m, noise_offset=run.cfg.noise_offset)
    captions = guard.captions(list(batch["caption"]))
    if run.text_cache is not None:
        embeds = run.text_cache(captions)
    else:
        with nullcontext() if m.train_text_encoder else torch.no_grad():
            embeds = run.encoder(captions, model=run.te_p)
    embeds = guard.embeds(embeds)
    if run.prediction_type == "epsilon":
        target = noise
    else:
        target = m.noise_scheduler.get_velocity(latents, noise, timesteps)
    items = run.item_keys()[batch["index"].cpu()] if guard.uses_items else None
    sources = list(batch["source_caption"])
    extra = guard.extra_inputs(step, embeds, captions, items, sources)
    # the family's per-image added conditioning (SDXL: size and crop time ids); the guard's probes keep
    # the encoder's defaults, as their base values were computed with them
    embeds = family_of(m.components).training_conditioning(embeds, batch, run.cfg.resolution)
    out = run.forward(*concat_inputs((noisy, timesteps, embeds), extra),
                      checkpointing=extra is not None and extra.checkpointing)
    model_pred, extra_out = split_output(out, latents.shape[0])
    per_sample = _per_sample_loss(run, model_pred, target, timesteps)
    res = guard.loss(GuardBatch(step=step, noisy=noisy, timesteps=timesteps, embeds=embeds, model_pred=model_pred,
                                per_sample=per_sample, extra_out=extra_out, forward=run.forward, captions=captions, items=items,
                                sources=sources))
    zero = (model_pred.float() * 0).sum() if res.loss is None else None
    return _MicroOut(loss=res.loss, zero=zero, loss_mse=res.loss_mse)


class _Window:
    """Per-optimizer-step accumulation of micro-batch results; gathered across processes at the end."""

    def __init__(self):
        self.items: list[_MicroOut] = []
        self.backward = False

    def add(self, out: _MicroOut) -> None:
        self.items.append(out)

    def summarize(self, accelerator) -> dict:
        mse = torch.stack([o.loss_mse.float().reshape(()) for o in self.items]).to(accelerator.device)
        mse_all = _gather_cat(accelerator, mse)
        mse_all = mse_all[~torch.isnan(mse_all)]
        return {tags.TRAIN_LOSS_MSE: float(mse_all.mean()) if mse_all.numel() else math.nan}


def _save_checkpoint(cfg, accelerator, global_step: int) -> None:
    path = ckpt.save_checkpoint(accelerator, cfg.output_dir, global_step, cfg.checkpoints_total_limit)
    if accelerator.is_main_process:
        logger.info("saved checkpoint %s", path)


@torch.no_grad()
def _calibration_batches(run: _Run, num_batches: int, gen: torch.Generator):
    """Noisy latents of a seeded sample of training batches, all randomness from ``gen`` (guard
    calibration, e.g. Wen's tau); yields ``{"noisy", "timesteps", "captions"}``."""
    cfg, m, dataset, device = run.cfg, run.models, run.dataset, run.accelerator.device
    n = min(len(dataset), num_batches * cfg.train_batch_size)
    order = torch.randperm(len(dataset), generator=gen)[:n].tolist()
    keys = [(dataset.data.train_idx[i], 0) for i in order]
    for start in range(0, n, cfg.train_batch_size):
        batch = data_mod.collate([dataset[k] for k in keys[start:start + cfg.train_batch_size]])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        _, _, timesteps, noisy = _noisy_latents(batch, m, gen=gen)
        yield {"noisy": noisy, "timesteps": timesteps, "captions": batch["caption"]}
