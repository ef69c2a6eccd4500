"""``guard.type: anisotropy_gate`` (alias ``penalty``): probes decide, the gate acts.

Every few optimizer steps a few captions of the batch are probed (:mod:`.probes`): their anisotropy
value on pure noise, read from the same UNet forward as the denoising batch. The threshold
(:mod:`.threshold`: an absolute tau, or a per-caption reference, :mod:`.reference`) says which probes
are over it; the caption gate (:mod:`.gate`) takes a caption whose probe fired out of the denoising
loss of this and every later batch. By default (``weight: 0``) that is all: the probes run in a
no-grad forward and only decide. A weight above 0 adds a penalty: ``penalty: anchor`` (:mod:`.anchor`)
brings the flagged rows back with the base model's predictions as their targets, bounded at every
accepted weight; ``penalty: score`` (:mod:`.loss`) adds the hinge on the probe score, whose gradient
pushes the probed value back under the threshold and so also hides the caption from the gate.
:mod:`.counters` logs how selective the firing and the gating are.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence, Union

import torch
from torch import Tensor

from memreg import log_tags as tags
from memreg.guards.anisotropy_gate.anchor import anchor_per_sample, anchored_mean, base_predictions
from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.guards.anisotropy_gate.counters import SelectivityCounters, probe_logs
from memreg.guards.anisotropy_gate.gate import CaptionGate, caption_keys
from memreg.guards.anisotropy_gate.loss import bound_force, penalty
from memreg.guards.anisotropy_gate.probes import (PROBE_FORWARDS, ProbeBatch, ProbeResult, ProbeSampler,
                                                  auto_probe_checkpointing)
from memreg.guards.anisotropy_gate.reference import Reference
from memreg.guards.anisotropy_gate.threshold import AbsoluteThreshold, Calibration, Calibrator, Threshold
from memreg.guards.base import ExtraInputs, Guard, GuardBatch, GuardContext, GuardLoss
from memreg.score import make_scorer

logger = logging.getLogger(__name__)

def build_threshold(cfg: AnisotropyGateConfig, ctx: GuardContext, calibrator: Calibrator) -> Threshold:
    """The configured verdict: the absolute tau for ``reference: none``, else the reference."""
    if cfg.reference == "none":
        return AbsoluteThreshold.from_config(cfg, calibrator, ctx.gather)
    return Reference.from_config(cfg, ctx, calibrator)


class AnisotropyGateGuard(Guard):
    """The parts wired behind the guard protocol.

    How the probes run (``probe_forward``): ``"fused"`` (concatenated onto the denoising batch: one
    forward, one backward; the only way under DDP), ``"separate"`` (a second forward; single process,
    ``guard.fused_forward: false``) or ``"measure"`` (weight 0: a no-grad forward of the unwrapped
    UNet in :meth:`extra_inputs`, before the denoising forward, so the probes decide but add no
    gradient, cost no backward and add nothing to the step's memory peak; the anchor penalty too,
    whose gradient flows through the flagged training rows instead).
    """

    name = "anisotropy_gate"
    state_key = "penalty"   # the guard's name before the rename: checkpoints written then still resume
    progress_keys = (tags.GUARD_PENALTY, tags.GUARD_COND_RATIO)

    def __init__(self, ctx: GuardContext, probes: ProbeSampler, calibrator: Calibrator, threshold: Threshold,
                 mode: str = "hinge", weight: float = 0.0, fused: bool = True,
                 probe_checkpointing: Union[bool, str] = "auto", max_force: float | None = None,
                 gate: CaptionGate | None = None, penalty: str = "score"):
        super().__init__(ctx)
        self.probes, self.calibrator, self.threshold = probes, calibrator, threshold
        if penalty == "anchor" and weight > 0:
            if gate is None:
                raise ValueError("the anchor penalty needs the gate (its flags name the rows)")
            if not ctx.has_base_model:
                raise ValueError("the anchor penalty needs the base model: LoRA adapters on the UNet, or a frozen copy "
                                 "of the base UNet as GuardContext.reference (full fine-tuning)")
        self.anchor_weight = float(weight) if penalty == "anchor" else 0.0
        self.mode, self.weight = mode, float(weight) if penalty == "score" else 0.0
        self.max_force = max_force if self.weight > 0 else None
        self.gate = gate                  # None: the denoising loss is the plain batch mean
        self.counters = SelectivityCounters(ctx.gather, gate=gate is not None)
        self.probe_forward = self._probe_forward(fused)
        pc = probe_checkpointing
        ckpt = (auto_probe_checkpointing(probes.probe_samples, ctx.batch_size, ctx.gradient_checkpointing)
                if pc == "auto" else bool(pc) and not ctx.gradient_checkpointing)
        self.probe_checkpointing = ckpt and self.probe_forward != "measure"
        self._probe: ProbeBatch | None = None
        self._outs: list[ProbeResult] = []
        self.final_report: dict | None = None
        self._steps_logged = 0
        self._warned_no_items = False
        # this step's micro-batches: (sum of anchor terms, anchored rows, rows, the anchor's change of the loss)
        self._anchor: list[tuple[float, int, int, float]] = []

    @classmethod
    def from_config(cls, cfg: AnisotropyGateConfig, ctx: GuardContext) -> "AnisotropyGateGuard":
        scorer = make_scorer(ctx.unet, ctx.noise_scheduler, preset=cfg.preset, t_hi=cfg.t_hi, t_lo=cfg.t_lo,
                             prediction_type=ctx.prediction_type)
        calibrator = Calibrator.from_config(cfg)
        return cls(ctx, ProbeSampler.from_config(cfg, scorer, ctx.seed, ctx.process_index, ctx.batch_size), calibrator,
                   build_threshold(cfg, ctx, calibrator), mode=cfg.mode, weight=cfg.weight, fused=cfg.fused_forward,
                   probe_checkpointing=cfg.probe_checkpointing, max_force=cfg.max_force,
                   gate=CaptionGate(cfg.gate_weight, cfg.gate_release, cfg.gate_key) if cfg.gate else None,
                   penalty=cfg.penalty)

    def _probe_forward(self, fused: bool) -> str:
        if self.weight == 0:
            return "measure"
        if fused:
            return "fused"
        if self.ctx.num_processes > 1:
            logger.warning("guard.fused_forward=false cannot work under DDP (one forward per backward); "
                           "falling back to the fused forward")
            return "fused"
        return "separate"

    @property
    def calibration(self) -> Calibration | None:
        return self.calibrator.calibration

    def describe(self) -> str:
        p = self.probes
        act = (f"; flagged rows anchored to the base model at weight {self.anchor_weight:g}" if self.anchor_weight
               else f"; score penalty at weight {self.weight:g}" if self.weight else "")
        return (f"penalty: {p.probe_samples} probe samples per active step {PROBE_FORWARDS[self.probe_forward]}; "
                f"every {p.every_n_steps} steps from step {p.warmup_steps}; term {p.signal}{self.threshold.describe()}"
                + act + ("; activation checkpointing on probe steps" if self.probe_checkpointing else ""))

    def _score_calibration_draws(self) -> tuple[Tensor, Tensor]:
        ctx = self.ctx
        with torch.no_grad():
            # chunks of batch_size captions (4x that many no-grad UNet samples): under the step's memory peak
            return self.probes.score_sample(ctx.train_captions, ctx.encode, ctx.uncond(), ctx.latent_shape,
                                            run_unet=ctx.run_unet, batch_size=ctx.batch_size)

    def calibrate(self) -> None:
        self.threshold.calibrate(self.ctx, self.probes)
        if self.calibrator.calibration is not None:   # resumed
            return
        cal = self.calibrator.calibrate_from_values(*self._score_calibration_draws())
        if self.ctx.num_processes > 1:
            cal = Calibration.from_tensor(self.ctx.broadcast(cal.as_tensor()))
            self.calibrator.set_calibration(cal)
        if self.ctx.is_main:
            logger.info("penalty calibration: tau=%.4f (q=%.2f of %d base-model scores; mu=%.4f sigma=%.4f), "
                        "reference guidance norm under tau=%.4f", cal.tau, cal.quantile, cal.num_values, cal.mu,
                        cal.sigma, cal.ref_norm)

    @property
    def uses_items(self) -> bool:
        return self.gate is not None and self.gate.key == "image"

    def _row_keys(self, captions: Sequence[str] | None, items: Tensor | None,
                  sources: Sequence[str] | None = None) -> Tensor | None:
        """Each row's key for the gate and the population: its item key with ``gate_key: image``,
        else the key of its dataset wording (``sources``, else its caption); None when unknown."""
        if self.gate is not None and self.gate.key == "image":
            if items is not None:
                return torch.as_tensor(items, dtype=torch.int64).cpu()
            if not self._warned_no_items:
                logger.warning("guard.gate_key: image, but the training loop passes no item keys (extra_inputs(..., "
                               "items=...)): the gate keys on the exact captions instead")
                self._warned_no_items = True
        wording = sources if sources is not None else captions
        return None if wording is None else caption_keys(wording)

    def extra_inputs(self, step: int, embeds: Tensor, captions: Sequence[str] | None,
                     items: Tensor | None = None, sources: Sequence[str] | None = None) -> ExtraInputs | None:
        caps = list(captions) if captions is not None and len(captions) == embeds.shape[0] else None
        if caps is None and (self.threshold.fixed_noise is not None or self.gate is not None):
            raise RuntimeError("guard.reference with a cache and guard.gate need the batch captions: pass them to "
                               "guard.extra_inputs(step, embeds, captions)")
        probe = self.probes.prepare(embeds, self.ctx.uncond(), self.ctx.latent_shape, step, caps,
                                    self.threshold.fixed_noise, row_keys=self._row_keys(caps, items, sources),
                                    sources=sources, encode=self.ctx.encode)
        if probe is not None:
            self.threshold.attach(probe, self.ctx, self.probes)
            if self.probe_forward == "measure":
                with torch.no_grad():
                    probe.out = self.ctx.run_unet(probe.sample, probe.timesteps, probe.embeds)
        self._probe = probe
        if probe is None or self.probe_forward != "fused":
            return None
        return ExtraInputs(probe.sample, probe.timesteps, probe.embeds, checkpointing=self.probe_checkpointing)

    def _probe_output(self, batch: GuardBatch, probe: ProbeBatch) -> Tensor:
        if self.probe_forward == "fused":
            return batch.extra_out
        if self.probe_forward == "separate":
            return batch.forward(probe.sample, probe.timesteps, probe.embeds, self.probe_checkpointing)
        return probe.out   # "measure": run in extra_inputs, before the denoising forward

    def loss(self, batch: GuardBatch) -> GuardLoss:
        probe, self._probe = self._probe, None
        result = probe_out = None
        if probe is not None:
            probe_out = self._probe_output(batch, probe)
            result = self._evaluate(probe_out, probe)
            if self.gate is not None:   # this step's verdicts act on this very batch
                unflagged = ~self.gate.is_flagged(probe.keys) if probe.keys is not None else None
                self.gate.update(result.keys.cpu(), self.ctx.gather(result.over.to(torch.uint8)).cpu())
                self._log_new_flags(batch.step, probe, result, unflagged)
        loss, mse = self._denoising_loss(batch)
        res = GuardLoss(loss=loss, loss_mse=mse)
        if result is None:
            return res
        if self.max_force is not None:
            result.weighted, result.force = bound_force(result.weighted, probe_out, loss, batch.model_pred,
                                                        self.max_force)
        self._outs.append(result)
        res.loss = loss + result.weighted
        return res

    def _log_new_flags(self, step: int, probe: ProbeBatch, result: ProbeResult, unflagged: Tensor | None) -> None:
        """One line per image (or caption) this process's probes flagged for the first time: what
        left the loss, when, and through which wording. ``unflagged``: the probed keys not flagged
        before this step's verdicts (a key probed twice in the step is named once)."""
        if probe.captions is None or unflagged is None:
            return
        quantity = result.growth if result.growth is not None else result.values
        named: set[int] = set()
        for key, cap, over, new, q in zip(probe.keys.tolist(), probe.captions, result.over.tolist(),
                                          unflagged.tolist(), quantity.tolist()):
            if over and new and key not in named:
                named.add(key)
                logger.info("gate: step %d flagged %s %016x through %r (probe %.4f)", step, self.gate.key, key, cap, q)

    def _evaluate(self, probe_out: Tensor, probe: ProbeBatch) -> ProbeResult:
        """The verdicts and the penalty on the probes' UNet output; ``keys``: every process's caption
        keys, gathered for the gate and the population."""
        values, norm = self.probes.values_from_output(probe_out, probe.latents)
        wanted = self.gate is not None or self.threshold.wants_keys
        keys = self.ctx.gather(probe.keys.to(probe_out.device)) if wanted and probe.keys is not None else None
        verdict = self.threshold.compare(values, probe)
        loss = penalty(self.mode, verdict)
        self.threshold.update(verdict, keys)
        result = ProbeResult(loss=loss, weighted=self.weight * loss, values=values.detach(), norm=norm.detach(),
                             over=verdict.over, growth=verdict.growth, keys=keys)
        if probe.captions is not None:
            result.duplicated = self.ctx.is_duplicated(probe.captions).to(result.values.device)
        return result

    def _denoising_loss(self, batch: GuardBatch) -> tuple[Tensor, Tensor]:
        """(loss, its denoising part, detached): the batch mean, or with the gate the weighted mean
        that leaves flagged rows out; with the anchor the flagged rows come back with the base
        model's predictions as targets (:func:`~memreg.guards.anisotropy_gate.anchor.anchored_mean`)."""
        if self.gate is None:
            loss = batch.per_sample.mean()
            return loss, loss.detach()
        caps = batch.captions
        if caps is None or len(caps) != batch.per_sample.shape[0]:
            raise RuntimeError("guard.gate needs the batch captions: pass GuardBatch(..., captions=captions)")
        keys = self._row_keys(caps, batch.items, batch.sources)
        w = self.gate.weights(keys)
        # duplicated rows by their dataset wording: an augmented or blanked caption is still its image's row
        self.counters.record_gated(w, self.ctx.is_duplicated(batch.sources if batch.sources is not None else caps))
        gated = self.gate.weighted_mean(batch.per_sample, w)
        rows = self.gate.is_flagged(keys).nonzero().flatten() if self.anchor_weight else None
        if rows is None:
            return gated, gated.detach()
        if rows.numel() == 0:
            self._anchor.append((0.0, 0, batch.per_sample.shape[0], 0.0))
            return gated, gated.detach()
        rows = rows.to(batch.model_pred.device)
        base = base_predictions(self.ctx, batch.noisy, batch.timesteps, batch.embeds, rows)
        anchor = anchor_per_sample(batch.model_pred[rows], base)
        loss = anchored_mean(batch.per_sample, w, anchor, rows, self.anchor_weight)
        self._anchor.append((float(anchor.detach().sum()), rows.numel(), batch.per_sample.shape[0],
                             float(loss.detach() - gated.detach())))
        return loss, gated.detach()

    def step_logs(self, logs: dict[str, float]) -> dict[str, float]:
        out = self._probe_step_logs(logs)
        if self.anchor_weight:   # after the probes' logs: the anchor is what this step's penalty added
            out.update(self._anchor_logs(logs))
        return out

    def _probe_step_logs(self, logs: dict[str, float]) -> dict[str, float]:
        cal, outs, self._outs = self.calibrator, self._outs, []
        out = {tags.GUARD_TAU: float(cal.tau) if cal.tau is not None else math.nan}
        out.update(self.counters.gate_logs(len(self.gate.flagged) if self.gate is not None else 0))
        if not outs:   # every process probes on the same steps, so the collectives below match
            return out
        g = self.ctx.gather
        vals, norms, over = (g(torch.cat([getattr(o, f) for o in outs]).float()) for f in ("values", "norm", "over"))
        over = over.cpu()
        out.update(probe_logs(outs, vals, over, g))
        out.update(self.threshold.logs(outs))
        known = all(o.duplicated is not None for o in outs)   # the probed captions were given
        dup = g(torch.cat([o.duplicated for o in outs]).float()).cpu() if known else None
        out.update(self.counters.fire_logs(over, dup))
        if self.max_force is not None:
            out[tags.GUARD_FORCE_RATIO] = float(g(torch.tensor([max(o.force for o in outs)], device=vals.device)).max())
        ratio = cal.cond_ratio(vals.cpu(), norms.cpu(), under=self.threshold.under(over))
        if not math.isnan(ratio):
            out[tags.GUARD_COND_RATIO] = ratio
        out[tags.TRAIN_LOSS] = logs[tags.TRAIN_LOSS_MSE] + out[tags.GUARD_WEIGHTED_PENALTY]
        self._steps_logged += 1
        if self.ctx.is_main and (self._steps_logged <= 1 or self._steps_logged % 50 == 0):
            thr = out.get(tags.GUARD_THRESHOLD, out[tags.GUARD_TAU])
            logger.info("probe step %d: threshold=%.4f probes over it %.0f%%, probe score mean %.4f, ordinary "
                        "conditioning ratio %.3f", self._steps_logged, thr, 100 * out[tags.GUARD_FRAC_OVER_TAU],
                        out[tags.GUARD_PROBE_SCORE_MEAN], ratio)
        return out

    def _anchor_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """This step's anchor over every process (each calls this on every step, so the collective
        matches): the mean term of the anchored rows, their share of the rows, and what it added to
        the loss (``weighted_penalty``; ``train/loss`` = the denoising part + it)."""
        parts, self._anchor = self._anchor, []
        t = torch.tensor([sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts),
                          sum(p[3] for p in parts), len(parts)], dtype=torch.float64)
        total, rows, seen, added, micro = (float(x) for x in self.ctx.reduce_sum(t).cpu())
        added = added / micro if micro else 0.0
        return {tags.GUARD_ANCHOR: total / rows if rows else 0.0, tags.GUARD_ANCHOR_ROWS: rows / seen if seen else 0.0,
                tags.GUARD_WEIGHTED_PENALTY: added, tags.TRAIN_LOSS: logs[tags.TRAIN_LOSS_MSE] + added}

    def finish(self) -> dict[str, float]:
        """Re-score the calibration draws (same captions and noise) with the trained model."""
        r = self.final_report = self.calibrator.conditioning_report(*self._score_calibration_draws())
        r.update(self.counters.totals())
        if self.ctx.is_main:
            logger.info("ordinary conditioning at the end: guidance norm of calibration draws that were under tau "
                        "at the start = %.4f (start %.4f, ratio %.3f); %.0f%% of draws now over tau=%.4f",
                        r["final_norm_under"], r["ref_norm"], r["final_cond_ratio"], 100 * r["final_frac_over"],
                        r["tau"])
        return r

    def state_dict(self) -> dict:
        gate = None if self.gate is None else dict(self.gate.state_dict(), counts=self.counters.gate_counts.clone())
        return {**self.probes.state_dict(), **self.calibrator.state_dict(),
                "fire_counts": self.counters.fire_counts.clone(), "reference": self.threshold.state_dict(),
                "gate": gate}

    def load_state_dict(self, state: dict) -> None:
        self.probes.load_state_dict(state)
        self.calibrator.load_state_dict(state)
        self.counters.load_fire_counts(state.get("fire_counts"))
        if state.get("reference") is not None:
            self.threshold.load_state_dict(state["reference"])
        if self.gate is not None and state.get("gate") is not None:
            self.gate.load_state_dict(state["gate"])
            self.counters.load_gate_counts(state["gate"]["counts"])
