"""The training loop: diffusers' text-to-image(-LoRA) recipe plus the memorization guard.

``train(cfg)`` runs one config end to end: early checks (output dir, model, prediction type,
data) -> accelerate setup -> models -> data -> guard -> optimizer/scheduler -> resume -> guard
calibration -> loop -> outputs. It works the same single-process and under
``accelerate launch --num_processes N`` (DDP; the penalty's probes ride in the one forward per
backward that DDP expects).

Guard (``cfg.guard.type``):

* ``penalty``: :class:`memreg.penalty.MemorizationPenalty`; probe inputs are concatenated onto
  the denoising batch and the UNet runs once (``guard.fused_forward``; a separate probe forward
  is used only single-process when asked for, and the log says which).
* ``wen_filter``: :class:`memreg.baselines.WenFilter` (no-grad unconditional forward, drop
  samples with ||eps_c - eps_u|| >= tau, skip the step when all processes dropped everything).
* ``caption_noise``: :class:`memreg.baselines.CaptionNoise` on captions and embeddings.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memreg.encoding import PromptEncoder
from memreg.training import checkpoint as ckpt
from memreg.training import data as data_mod
from memreg.training.config import TrainConfig, flat_dict, save_config
from memreg.training.metrics import StepTimer, peak_memory_mb
from memreg.training.setup import _to, check_prediction_type, clip_trainable_grads, setup_models

logger = logging.getLogger("memreg.train")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    logs: list[dict] = field(default_factory=list)      # one dict per optimizer step (main process)
    calibration: Any = None
    final_report: dict | None = None
    data_summary: Any = None
    probe_forward: str | None = None   # fused | separate | measure (penalty runs only)


def _resolve_seed(cfg: TrainConfig, accelerator) -> int:
    """The training seed (drawn on the main process and shared when not given) and the guard's."""
    if cfg.seed is None:
        from accelerate.utils import broadcast_object_list

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


def _quantile(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.double().cpu(), q)) if t.numel() else math.nan


def train(cfg: TrainConfig, meter=None) -> TrainResult:
    """Run ``cfg``. ``meter``: optional :class:`~memreg.training.metrics.SavedTensorMeter` wrapped
    around each micro-step's forward (benchmarks: activation memory on CPU, logged as
    ``perf/activation_mb``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm

    # ------------------------------------------------------------------ early checks (no weights loaded)
    resuming = bool(cfg.resume_from_checkpoint)
    resume_path = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir) if resuming else None
    ckpt.check_output_dir(cfg.output_dir, resuming=resuming, overwrite=cfg.overwrite_output_dir)
    data_mod.check_data_source(cfg.train_data_dir, cfg.dataset_name)
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
    try:
        seed = _resolve_seed(cfg, accelerator)
        return _train(cfg, accelerator, seed, resume_path, model_prediction_type, set_seed, get_scheduler,
                      compute_snr, tqdm, meter)
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _train(cfg, accelerator, seed, resume_path, model_prediction_type, set_seed, get_scheduler, compute_snr,
           tqdm, meter=None) -> TrainResult:
    device = accelerator.device
    rank = accelerator.process_index
    g = cfg.guard

    # Data before weights: a bad dataset fails fast (same split on every process).
    with accelerator.main_process_first():
        data = data_mod.build_train_data(cfg, seed)
    if accelerator.is_main_process:
        s = data.summary
        logger.info("data: %d samples (%d train, %d held out, %d unreadable skipped)",
                    s.num_total, s.num_train, s.num_heldout, s.skipped)
    if not data.train_idx:
        raise data_mod.DataError("no training samples left after the held-out split")

    set_seed(seed, device_specific=True)
    models = setup_models(cfg, device, accelerator.mixed_precision)
    unet, te, vae, tokenizer = models.unet, models.text_encoder, models.vae, models.tokenizer
    noise_scheduler = models.noise_scheduler
    wdtype = models.weight_dtype
    prediction_type = model_prediction_type
    encoder = PromptEncoder(tokenizer, te, device)

    latent_cache = None
    if cfg.cache_latents:
        if not cfg.center_crop:
            logger.info("cache_latents: images are center-cropped (a random crop cannot be cached)")
        latent_cache = data_mod.build_latent_cache(data, vae, cfg.resolution, cfg.random_flip, device, wdtype)
    dataset = data_mod.TrainDataset(data, cfg.resolution, cfg.center_crop, cfg.random_flip, seed,
                                    latent_cache=latent_cache, proportion_empty_prompts=cfg.proportion_empty_prompts)
    dataloader = data_mod.make_dataloader(dataset, cfg.train_batch_size, cfg.dataloader_num_workers, seed)
    sampler = dataloader.sampler
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.resolution % vae_scale:
        raise data_mod.DataError(f"resolution={cfg.resolution} is not a multiple of the VAE factor {vae_scale}")
    latent_shape = (unet.config.in_channels, cfg.resolution // vae_scale, cfg.resolution // vae_scale)

    # ------------------------------------------------------------------ guard
    penalty = wen = cnoise = None
    guard_objects: dict[str, Any] = {}
    if g.type == "penalty":
        from memreg.penalty import MemorizationPenalty, make_scorer

        scorer = make_scorer(unet, noise_scheduler, preset=g.preset, t_hi=g.t_hi, t_lo=g.t_lo,
                             prediction_type=prediction_type)
        penalty = MemorizationPenalty(
            scorer, mode=g.mode, weight=g.weight, tau=g.tau, probes_per_step=g.probes_per_step,
            every_n_steps=g.every_n_steps, warmup_steps=g.warmup_steps, term=g.term, zscore=g.zscore,
            tau_z=g.tau_z, tau_quantile=g.tau_quantile, tau_ema=g.tau_ema, calibration_prompts=g.calibration_prompts,
            calibration_seeds=g.calibration_seeds, seed=g.seed, process_index=rank)
        guard_objects["penalty"] = penalty
    elif g.type == "wen_filter":
        from memreg.baselines import WenFilter

        wen = WenFilter(noise_scheduler.alphas_cumprod, prediction_type, tau=g.wen.tau, tau_quantile=g.wen.tau_quantile)
        guard_objects["wen_filter"] = wen
    elif g.type == "caption_noise":
        from memreg.baselines import CaptionNoise

        cn = g.caption_noise
        cnoise = CaptionNoise.from_tokenizer(tokenizer, word_prob=cn.word_prob, num_words=cn.num_words,
                                             embed_noise=cn.embed_noise, seed=g.seed + 7919 * rank)
        guard_objects["caption_noise"] = cnoise

    # How the probes run: "fused" (concatenated onto the denoising batch: one forward, one backward),
    # "separate" (a second forward; single process only), or "measure" (weight 0: a no-grad forward of
    # the unwrapped UNet, so the probes are logged but cannot change training, and cost no backward).
    probe_forward = None
    probe_ckpt = False
    if penalty is not None:
        probe_forward = "fused"
        if penalty.weight == 0:
            probe_forward = "measure"
        elif not g.fused_forward:
            if accelerator.num_processes > 1:
                logger.warning("guard.fused_forward=false cannot work under DDP (one forward per backward); "
                               "falling back to the fused forward")
            else:
                probe_forward = "separate"
        pc = g.probe_checkpointing
        probe_ckpt = (not cfg.gradient_checkpointing) if pc == "auto" else bool(pc) and not cfg.gradient_checkpointing
        probe_ckpt = probe_ckpt and probe_forward in ("fused", "separate")
        if accelerator.is_main_process:
            per = penalty.probes_per_step * (4 if g.term == "combined" else 2)
            how = {"fused": "in the denoising UNet forward (one forward per backward)",
                   "separate": "in a separate UNet forward (guard.fused_forward=false)",
                   "measure": "in a separate no-grad forward (weight 0: measured, no training effect)"}[probe_forward]
            logger.info("penalty: %d probe samples per active step %s; batch %d, every %d steps from step %d%s",
                        per, how, cfg.train_batch_size, g.every_n_steps, g.warmup_steps,
                        "; activation checkpointing on probe steps" if probe_ckpt else "")

    # ------------------------------------------------------------------ optimizer, schedule, prepare
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr = lr * cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    params = models.trainable_params
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * max(per_epoch, 1)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    if models.train_text_encoder:
        unet_p, te_p, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, te, optimizer, dataloader,
                                                                                lr_scheduler)
        trained_models = [unet_p, te_p]
    else:
        unet_p, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
        te_p = te
        trained_models = [unet_p]
    per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)
    num_epochs = math.ceil(max_steps / per_epoch)

    ckpt.register_hooks(accelerator, cfg.mode, unet, te if models.train_text_encoder else None, models.ema,
                        guard_objects)

    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        if accelerator.log_with:
            accelerator.init_trackers(cfg.tracker_project_name, config=flat_dict(cfg))

    global_step = 0
    first_epoch = 0
    skip_batches = 0
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = ckpt.step_of(resume_path)
        first_epoch = global_step // per_epoch
        skip_batches = (global_step % per_epoch) * cfg.gradient_accumulation_steps

    # ------------------------------------------------------------------ guard calibration (base model)
    train_caps = data.train_captions()
    if penalty is not None and penalty.calibration is None:
        with torch.no_grad(), accelerator.autocast():
            # chunks of train_batch_size captions (4x that many no-grad UNet samples): the calibration
            # pass stays under the training step's memory peak
            cal = penalty.calibrate(
                train_caps, lambda caps: encoder(caps), encoder.uncond(), latent_shape,
                run_unet=lambda s, t, e: unet(s.to(wdtype), t, encoder_hidden_states=e.to(wdtype),
                                              return_dict=False)[0], batch_size=cfg.train_batch_size)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            from memreg.penalty import Calibration

            cal = Calibration.from_tensor(broadcast(cal.as_tensor().to(device), from_process=0))
            penalty.set_calibration(cal)
        if accelerator.is_main_process:
            logger.info("penalty calibration: tau=%.4f (q=%.2f of %d base-model scores; mu=%.4f sigma=%.4f), "
                        "reference guidance norm under tau=%.4f", cal.tau, cal.quantile, cal.num_values, cal.mu,
                        cal.sigma, cal.ref_norm)
    if wen is not None and wen.tau is None:
        norms = _wen_calibration_norms(cfg, dataset, encoder, unet, vae, noise_scheduler, wen, wdtype, device,
                                       accelerator)
        tau = wen.calibrate(norms)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            wen.tau = float(broadcast(torch.tensor([tau], dtype=torch.float64, device=device), from_process=0)[0])
        if accelerator.is_main_process:
            logger.info("wen_filter calibration: tau=%.4f (q=%.2f of %d base-model norms)", wen.tau,
                        g.wen.tau_quantile, norms.numel())

    # ------------------------------------------------------------------ monitor
    monitor = None
    if cfg.eval.enabled and accelerator.is_main_process:
        from memreg.models import SDComponents
        from memreg.monitor import MemorizationMonitor

        comps = SDComponents(tokenizer=tokenizer, text_encoder=te, unet=unet, vae=vae,
                             scheduler=noise_scheduler, model=cfg.pretrained_model_name_or_path)
        monitor = MemorizationMonitor(cfg.eval, components=comps, train_records=data.records("train"),
                                      heldout_records=data.records("heldout"), accelerator=accelerator,
                                      output_dir=cfg.output_dir)

    def run_monitor(step: int, final: bool) -> None:
        if monitor is None:
            return
        ema = models.ema
        if ema is not None:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
        try:
            monitor.maybe_run(step, unet=accelerator.unwrap_model(unet_p), final=final)
        finally:
            if ema is not None:
                ema.restore(unet.parameters())

    run_monitor(global_step, final=False)

    # ------------------------------------------------------------------ loop
    total_batch = cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    if accelerator.is_main_process:
        logger.info("training: %d steps (%d epochs of %d), batch %d x %d processes x %d accumulation = %d, mode %s, "
                    "guard %s", max_steps, num_epochs, per_epoch, cfg.train_batch_size, accelerator.num_processes,
                    cfg.gradient_accumulation_steps, total_batch, cfg.mode, g.type)
    progress = tqdm(range(max_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process or bool(os.environ.get("TQDM_DISABLE")))
    timer = StepTimer(device)
    timer.start()
    result = TrainResult(output_dir=Path(cfg.output_dir), global_step=global_step, data_summary=data.summary,
                         probe_forward=probe_forward,
                         calibration=penalty.calibration if penalty is not None else None)
    window = _Window()
    wen_skipped = 0
    stop = cfg.stop_at_step
    done = global_step >= max_steps or (stop is not None and global_step >= stop)

    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        dataloader.set_epoch(epoch)
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
            loader.set_epoch(epoch)
        sampler.set_epoch(epoch)  # the one EpochSampler all wrappers share
        for batch in loader:
            with accelerator.accumulate(*trained_models):
                if meter is not None:
                    meter.reset()
                with meter if meter is not None else nullcontext():
                    out = _micro_step(cfg, batch, accelerator, unet_p, unet, te_p, vae, encoder, noise_scheduler,
                                      prediction_type, wdtype, compute_snr, penalty, wen, cnoise, global_step,
                                      probe_forward, models.train_text_encoder, probe_ckpt)
                window.add(out)
                if out.loss is not None:
                    accelerator.backward(out.loss)
                    window.backward = True
                elif window.backward:
                    # Skipped micro-batch after others in this window: a zero backward keeps DDP in sync.
                    accelerator.backward(out.zero)
                grad_norm = None
                if accelerator.sync_gradients and window.backward:
                    grad_norm = clip_trainable_grads(accelerator, params, cfg.max_grad_norm)
                if window.backward:
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step done (or skipped by the Wen filter)
            if models.ema is not None and window.backward:
                models.ema.step(unet.parameters())
            if not window.backward:
                wen_skipped += 1
            step_time = timer.lap()
            logs = window.summarize(accelerator, penalty)
            logs.update({"train/lr": lr_scheduler.get_last_lr()[0], "perf/step_time_s": step_time,
                         "perf/samples_per_s": total_batch / step_time if step_time > 0 else math.nan,
                         "perf/peak_mem_mb": peak_memory_mb(device)})
            if grad_norm is not None:
                logs["train/grad_norm"] = grad_norm
            if meter is not None:
                logs["perf/activation_mb"] = meter.peak / 2**20
                meter.peak = 0
            if wen is not None:
                logs["guard/wen_tau"] = wen.tau
                logs["guard/wen_skipped_steps"] = wen_skipped
            window = _Window()
            global_step += 1
            progress.update(1)
            progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items()
                                  if k in ("train/loss_mse", "guard/penalty", "guard/cond_ratio")})
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                result.logs.append(dict(logs, step=global_step))
                if penalty is not None and "guard/probe_score_mean" in logs and (
                        global_step <= 1 or global_step % 50 == 0):
                    logger.info("step %d guard: tau=%.4f probes over tau %.0f%%, probe score mean %.4f, "
                                "ordinary conditioning ratio %.3f", global_step, logs["guard/tau"],
                                100 * logs["guard/frac_over_tau"], logs["guard/probe_score_mean"],
                                logs.get("guard/cond_ratio", math.nan))
            if global_step % cfg.checkpointing_steps == 0:
                _save_checkpoint(cfg, accelerator, global_step)
            run_monitor(global_step, final=False)
            timer.start()
            if global_step >= max_steps or (stop is not None and global_step >= stop):
                done = True
                break

    accelerator.wait_for_everyone()
    result.global_step = global_step
    if stop is not None and global_step >= stop and global_step < max_steps:
        logger.info("stop_at_step=%d reached: stopping without final outputs (resume to finish)", stop)
        progress.close()
        return result

    # ------------------------------------------------------------------ outputs
    if penalty is not None:
        result.final_report = _final_conditioning_report(penalty, train_caps, encoder, unet, latent_shape, wdtype,
                                                         accelerator, batch_size=cfg.train_batch_size)
        if accelerator.is_main_process:
            r = result.final_report
            logger.info("ordinary conditioning at the end: guidance norm of calibration draws that were under tau "
                        "at the start = %.4f (start %.4f, ratio %.3f); %.0f%% of draws now over tau=%.4f",
                        r["final_norm_under"], r["ref_norm"], r["final_cond_ratio"], 100 * r["final_frac_over"],
                        r["tau"])
            accelerator.log({f"guard/{k}": v for k, v in r.items()}, step=global_step)
    if accelerator.is_main_process:
        if cfg.mode == "lora":
            written = ckpt.save_lora(cfg.output_dir, unet, te if models.train_text_encoder else None)
            logger.info("saved LoRA weights: %s", ", ".join(str(p) for p in written.values()))
        else:
            if models.ema is not None:
                models.ema.copy_to(unet.parameters())
            for m in (unet, te, vae):
                _to(m, device, torch.float32)
            ckpt.save_full_pipeline(cfg.output_dir, cfg.pretrained_model_name_or_path, unet, te, vae, tokenizer,
                                    revision=cfg.revision, variant=cfg.variant)
            logger.info("saved the fine-tuned pipeline to %s", cfg.output_dir)
    run_monitor(global_step, final=True)
    accelerator.wait_for_everyone()
    progress.close()
    return result


# ---------------------------------------------------------------------- one micro-batch

@dataclass
class _MicroOut:
    loss: torch.Tensor | None                 # None: skip backward (Wen filter dropped every sample)
    zero: torch.Tensor | None                 # a zero loss with graph, for DDP-sync on a skipped step
    loss_mse: torch.Tensor
    penalty: torch.Tensor | None = None
    probe_values: torch.Tensor | None = None
    probe_norms: torch.Tensor | None = None
    probe_over: torch.Tensor | None = None
    wen_kept: torch.Tensor | None = None
    batch_size: int = 0


def _latents(batch, vae, wdtype) -> torch.Tensor:
    if "pixel_values" in batch:
        lat = vae.encode(batch["pixel_values"].to(wdtype)).latent_dist.sample()
    else:
        mean, std = batch["latent_mean"], batch["latent_std"]
        lat = mean + std * torch.randn_like(mean)
    return lat * vae.config.scaling_factor


def _micro_step(cfg, batch, accelerator, unet_p, unet, te_p, vae, encoder, noise_scheduler, prediction_type,
                wdtype, compute_snr, penalty, wen, cnoise, global_step, probe_forward, train_te,
                probe_ckpt=False) -> _MicroOut:
    with torch.no_grad():
        latents = _latents(batch, vae, wdtype)
    noise = torch.randn_like(latents)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                       device=latents.device, dtype=latents.dtype)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    captions = list(batch["caption"])
    if cnoise is not None:
        captions = cnoise.captions(captions)
    ctx = nullcontext() if train_te else torch.no_grad()
    with ctx:
        embeds = encoder(captions, model=te_p)
    if cnoise is not None:
        embeds = cnoise.embeds(embeds)

    if prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)

    uncond = None
    if penalty is not None or wen is not None:
        uncond = encoder.uncond(fresh=train_te)

    uncond_pred = None
    if wen is not None:
        with torch.no_grad(), accelerator.autocast():
            u = uncond.expand(bsz, *uncond.shape[1:]).to(wdtype)
            uncond_pred = unet(noisy.to(wdtype), timesteps, encoder_hidden_states=u, return_dict=False)[0]

    probe = None
    if penalty is not None:
        probe = penalty.prepare(embeds, uncond, tuple(latents.shape[1:]), global_step)

    fused = probe is not None and probe_forward == "fused"
    sample, ts, enc = noisy, timesteps, embeds
    if fused:
        sample = torch.cat([noisy, probe.sample.to(noisy.dtype)])
        ts = torch.cat([timesteps, probe.timesteps.to(timesteps.device)])
        enc = torch.cat([embeds, probe.embeds.to(embeds.dtype)])
    ckpt_now = probe_ckpt and probe is not None and probe_forward in ("fused", "separate")
    if ckpt_now:  # recompute activations in backward on probe steps instead of holding them
        unet.enable_gradient_checkpointing()
    try:
        out = unet_p(sample, ts, encoder_hidden_states=enc, return_dict=False)[0]
        probe_out = None
        if probe is not None and probe_forward == "separate":
            probe_out = unet_p(probe.sample.to(noisy.dtype), probe.timesteps,
                               encoder_hidden_states=probe.embeds.to(embeds.dtype), return_dict=False)[0]
    finally:
        if ckpt_now:
            unet.disable_gradient_checkpointing()
    model_pred = out[:bsz]
    if probe is not None:
        if fused:
            probe_out = out[bsz:]
        elif probe_forward == "measure":
            with torch.no_grad(), accelerator.autocast():
                probe_out = unet(probe.sample.to(noisy.dtype), probe.timesteps,
                                 encoder_hidden_states=probe.embeds.to(embeds.dtype), return_dict=False)[0]

    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        w = torch.stack([snr, cfg.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        per_sample = per_sample * w

    res = _MicroOut(loss=None, zero=None, loss_mse=per_sample.mean().detach(), batch_size=bsz)
    if wen is not None:
        norms = wen.norms(model_pred, uncond_pred, noisy, timesteps)
        keep = wen.keep(norms)
        res.wen_kept = keep.float()
        kept_total = accelerator.reduce(keep.sum().to(torch.float32).reshape(1), reduction="sum")
        zero = (model_pred.float() * 0).sum()
        if float(kept_total) == 0:
            res.zero = zero
            res.loss_mse = torch.tensor(math.nan)
            return res
        loss_mse = wen.masked_loss(per_sample, keep)
        if loss_mse is None:  # this process dropped all its samples, others did not: contribute zero grads
            res.loss_mse = torch.tensor(math.nan)
            res.loss = zero
        else:
            res.loss_mse = loss_mse.detach()
            res.loss = loss_mse + zero
        return res

    loss = per_sample.mean()
    if probe is not None:
        gather = (lambda v: _gather_cat(accelerator, v)) if penalty.zscore == "batch" else None
        pout = penalty.compute(probe_out, probe, gather=gather)
        loss = loss + pout.weighted
        res.penalty = pout.loss.detach()
        res.probe_values, res.probe_norms, res.probe_over = pout.values, pout.norm, pout.over
        if penalty.tau_ema > 0:
            penalty.update_tau(_gather_cat(accelerator, pout.values))
    res.loss = loss
    return res


class _Window:
    """Per-optimizer-step accumulation of micro-batch results; gathered across processes at the end."""

    def __init__(self):
        self.items: list[_MicroOut] = []
        self.backward = False

    def add(self, out: _MicroOut) -> None:
        self.items.append(out)

    def summarize(self, accelerator, penalty) -> dict:
        logs: dict[str, float] = {}
        mse = torch.stack([o.loss_mse.float().reshape(()) for o in self.items]).to(accelerator.device)
        mse_all = _gather_cat(accelerator, mse)
        mse_all = mse_all[~torch.isnan(mse_all)]
        logs["train/loss_mse"] = float(mse_all.mean()) if mse_all.numel() else math.nan
        probes = [o for o in self.items if o.probe_values is not None]
        if penalty is not None:
            logs["guard/tau"] = float(penalty.tau) if penalty.tau is not None else math.nan
            # every process has probes on the same steps, so these collectives match
            if probes:
                vals = _gather_cat(accelerator, torch.cat([o.probe_values for o in probes]).float())
                norms = _gather_cat(accelerator, torch.cat([o.probe_norms for o in probes]).float())
                over = _gather_cat(accelerator, torch.cat([o.probe_over for o in probes]).float())
                pen = _gather_cat(accelerator, torch.stack([o.penalty.float() for o in probes]))
                logs["guard/penalty"] = float(pen.mean())
                logs["guard/weighted_penalty"] = penalty.weight * float(pen.mean())
                logs["guard/probe_score_mean"] = float(vals.mean())
                logs["guard/probe_score_p95"] = _quantile(vals, 0.95)
                logs["guard/frac_over_tau"] = float(over.mean())
                ratio = penalty.cond_ratio(vals.cpu(), norms.cpu())
                if not math.isnan(ratio):
                    logs["guard/cond_ratio"] = ratio
                logs["train/loss"] = logs["train/loss_mse"] + logs["guard/weighted_penalty"]
        kept = [o.wen_kept for o in self.items if o.wen_kept is not None]
        if kept:
            k = _gather_cat(accelerator, torch.cat(kept))
            logs["guard/wen_kept_frac"] = float(k.mean())
        return logs


def _save_checkpoint(cfg, accelerator, global_step: int) -> None:
    path = Path(cfg.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("saved checkpoint %s", path)


@torch.no_grad()
def _wen_calibration_norms(cfg, dataset, encoder, unet, vae, noise_scheduler, wen, wdtype, device,
                           accelerator) -> torch.Tensor:
    """Base-model ||eps_c - eps_u|| on a seeded sample of training batches (own generator)."""
    gen = torch.Generator("cpu").manual_seed(int(cfg.guard.seed) + 31)
    n = min(len(dataset), cfg.guard.wen.calibration_batches * cfg.train_batch_size)
    order = torch.randperm(len(dataset), generator=gen)[:n].tolist()
    keys = [(dataset.data.train_idx[i], 0) for i in order]
    uncond = encoder.uncond()
    norms = []
    for start in range(0, n, cfg.train_batch_size):
        items = [dataset[k] for k in keys[start:start + cfg.train_batch_size]]
        batch = data_mod.collate(items)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if "pixel_values" in batch:
            dist = vae.encode(batch["pixel_values"].to(wdtype)).latent_dist
            lat = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
        else:
            lat = batch["latent_mean"] + batch["latent_std"] * torch.randn(
                batch["latent_mean"].shape, generator=gen).to(batch["latent_mean"])
        lat = lat * vae.config.scaling_factor
        b = lat.shape[0]
        noise = torch.randn(lat.shape, generator=gen).to(lat)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(lat, noise, t)
        cond = encoder(batch["caption"])
        with accelerator.autocast():
            c = unet(noisy.to(wdtype), t, encoder_hidden_states=cond.to(wdtype), return_dict=False)[0]
            u = unet(noisy.to(wdtype), t, encoder_hidden_states=uncond.expand(b, *uncond.shape[1:]).to(wdtype),
                     return_dict=False)[0]
        norms.append(wen.norms(c, u, noisy, t).cpu())
    return torch.cat(norms)


@torch.no_grad()
def _final_conditioning_report(penalty, train_caps, encoder, unet, latent_shape, wdtype, accelerator,
                               batch_size: int = 16) -> dict:
    """Re-score the calibration draws (same captions and noise) with the trained model."""
    with accelerator.autocast():
        values, norms = penalty.score_sample(
            train_caps, lambda caps: encoder(caps), encoder.uncond(), latent_shape,
            run_unet=lambda s, t, e: unet(s.to(wdtype), t, encoder_hidden_states=e.to(wdtype), return_dict=False)[0],
            batch_size=batch_size)
    return penalty.conditioning_report(values, norms)
