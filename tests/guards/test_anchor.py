"""The anchor penalty (memreg/guards/anisotropy_gate/anchor.py, ``guard.penalty: anchor``): the loss by
hand, its bounds refused at load time, the guard's loss on a flagged batch by hand, the trainer's
frozen base copy."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from memreg import log_tags as tags
from memreg.config_schema import ConfigError
from memreg.guards import GuardBatch, GuardContext, build_guard, guard_config
from memreg.guards.anisotropy_gate.anchor import anchor_per_sample, anchored_mean
from memreg.guards.anisotropy_gate.gate import CaptionGate, caption_keys

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle", "a blue square", "a green cross", "a red circle"]


# ----------------------------------------------------------------------------- the loss by hand

def test_anchored_mean_by_hand():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])                       # rows 1 and 3 flagged (gate_weight 0)
    anchor = torch.tensor([10.0, 20.0], requires_grad=True)      # their anchor terms
    rows = torch.tensor([1, 3])
    # (1 + 3 + 0.5 * (10 + 20)) / (2 + 0.5 * 2) = 19 / 3
    out = anchored_mean(per, w, anchor, rows, 0.5)
    assert float(out) == pytest.approx(19 / 3)
    out.backward()
    assert per.grad.tolist() == pytest.approx([1 / 3, 0, 1 / 3, 0])
    assert anchor.grad.tolist() == pytest.approx([0.5 / 3, 0.5 / 3])
    # at weight 1 a flagged row counts as an ordinary row: (1 + 3 + 10 + 20) / 4
    assert float(anchored_mean(per, w, anchor, rows, 1.0)) == pytest.approx(34 / 4)


def test_anchored_mean_at_weight_zero_is_the_gate_mean_and_keeps_the_graph_when_empty():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([1.0, 0.5, 1.0, 0.5])
    got = anchored_mean(per, w, torch.tensor([7.0, 9.0]), torch.tensor([1, 3]), 0.0)
    assert torch.equal(got, CaptionGate.weighted_mean(per, w))
    p = torch.ones(2, requires_grad=True)
    zero = anchored_mean(p, torch.zeros(2), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    zero.backward()
    assert float(zero) == 0.0 and p.grad.tolist() == [0.0, 0.0]


def test_anchor_per_sample_by_hand():
    pred = torch.zeros(2, 1, 2, 2)
    base = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert anchor_per_sample(pred, base).tolist() == [1.0, 1.0]     # 4 * 1 / 4; 4 / 4


# ----------------------------------------------------------------------------- bounds, refused before any weights load

@pytest.mark.parametrize("cfg, match", [
    ({"weight": 1.5}, "must be in \\[0, 1\\] with guard.penalty: anchor"),
    ({"weight": 0.5, "gate": False}, "anchor needs guard.gate: true"),
    ({"penalty": "score", "weight": 0.3, "max_force": None}, "needs guard.max_force"),
    ({"penalty": "score", "weight": 0.3, "max_force": 2.0}, "guard.max_force=2.0 must be in \\(0, 1\\]"),
    ({"penalty": "hinge"}, "guard.penalty"),
])
def test_unsafe_penalties_are_refused(cfg, match):
    with pytest.raises(ConfigError, match=match):
        guard_config({"type": "penalty", **cfg})


def test_safe_penalties_are_accepted():
    assert guard_config({"type": "penalty", "weight": 1.0}).anchored
    assert not guard_config({"type": "penalty", "weight": 0.0}).anchored
    s = guard_config({"type": "penalty", "penalty": "score", "weight": 5.0, "max_force": 0.5})
    assert s.penalty == "score" and not s.anchored


def test_full_fine_tuning_keeps_a_base_copy_only_when_the_guard_runs_the_base():
    from memreg.training.config import keeps_base_copy, load_config

    tiny = str(REPO / "configs" / "tiny_cpu.yaml")

    def keeps(*argv):
        return keeps_base_copy(load_config(["--config", tiny, "--guard.type", "penalty", *argv]))

    assert keeps("--mode", "full", "--guard.weight", "0.5")
    assert keeps("--mode", "full", "--guard.reference_source", "forward")
    assert not keeps("--mode", "full")                       # weight 0, base values cached
    assert not keeps("--mode", "lora", "--guard.weight", "0.5")   # LoRA: the adapters disabled


# ----------------------------------------------------------------------------- the guard's loss on a flagged batch

def _guard(c, reference, weight):
    from memreg.encoding import PromptEncoder

    enc = PromptEncoder(c.tokenizer, c.text_encoder)
    ctx = GuardContext(unet=c.unet, noise_scheduler=c.scheduler, encode=lambda caps: enc(caps), uncond=enc.uncond,
                       latent_shape=(4, 16, 16), train_captions=CAPTIONS, seed=11, reference=reference)
    cfg = {"type": "penalty", "gate": True, "gate_key": "caption", "reference": "none", "zscore": "none",
           "term": "norm", "tau": 1e9, "every_n_steps": 1, "probes_per_step": 1, "calibration_prompts": 4,
           "calibration_seeds": 1, "weight": weight}
    return build_guard(cfg, ctx), enc


@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_flagged_rows_are_pulled_toward_the_base_prediction(eps_components, shift):
    """'a red circle' (rows 0 and 3) is flagged; the base is the trained UNet with every weight
    shifted by ``shift``. Loss = (d1 + d2 + 0.5 (a0 + a3)) / (2 + 0.5 * 2), a_i the row's mean
    squared distance from the base's prediction, computed here by hand."""
    c = eps_components
    base = copy.deepcopy(c.unet).requires_grad_(False)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(shift)
    guard, enc = _guard(c, base, weight=0.5)
    guard.calibrate()
    guard.gate.flagged = set(caption_keys(["a red circle"]).tolist())
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(4, 4, 16, 16, generator=g), torch.tensor([10, 200, 500, 900])
    embeds = enc(list(CAPTIONS))
    guard.extra_inputs(0, embeds, list(CAPTIONS))        # a probe, under tau 1e9: no new flag
    pred = c.unet(noisy, t, encoder_hidden_states=embeds).sample
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    res = guard.loss(GuardBatch(0, noisy, t, embeds, pred, per, captions=list(CAPTIONS)))
    with torch.no_grad():
        ref = base(noisy, t, encoder_hidden_states=embeds).sample
    a = (pred.detach() - ref).pow(2).mean(dim=(1, 2, 3))
    want = (2.0 + 3.0 + 0.5 * (a[0] + a[3])) / 3.0
    assert float(res.loss) == pytest.approx(float(want), rel=1e-5)
    assert (float(a[0]) == 0.0) == (shift == 0.0)       # the same weights: nothing to pull
    logs = guard.step_logs({tags.TRAIN_LOSS_MSE: float(res.loss_mse)})
    assert logs[tags.GUARD_ANCHOR_ROWS] == pytest.approx(0.5)
    assert logs[tags.GUARD_ANCHOR] == pytest.approx(float((a[0] + a[3]) / 2), rel=1e-5)


# ----------------------------------------------------------------------------- the trainer

def _training_helpers():
    spec = importlib.util.spec_from_file_location("_training_conftest", REPO / "tests/training/conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ANCHOR_ON = dict(guard__type="penalty", guard__weight=1.0, guard__every_n_steps=1, guard__probes_per_step=2,
                 guard__term="norm", guard__reference="none", guard__zscore="none", guard__tau=-1e9,
                 guard__calibration_prompts=4, guard__calibration_seeds=1, guard__gate_key="caption")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trainer_anchors_flagged_rows_to_a_base_that_stays_frozen(tiny_sd_eps, tmp_path, mode):
    h = _training_helpers()
    data = h.make_imagefolder(tmp_path / "data")
    res = h.run(tiny_sd_eps, data, tmp_path / "out", steps=3, mode=mode, **ANCHOR_ON)
    g = res.guard
    assert g.anchor_weight == 1.0 and g.probe_forward == "measure" and g.gate.flagged
    anchored = [log[tags.GUARD_ANCHOR_ROWS] for log in res.logs]
    assert all(0.0 <= x <= 1.0 for x in anchored) and max(anchored) > 0
    if mode == "full":
        from memreg.models import load_components

        ref = g.ctx.reference
        start = load_components(str(tiny_sd_eps)).unet.state_dict()
        assert all(torch.equal(v, start[k]) for k, v in ref.state_dict().items())        # frozen
        assert any(not torch.equal(v, start[k]) for k, v in g.ctx.unet.state_dict().items())   # trained
        assert max(log[tags.GUARD_ANCHOR] for log in res.logs) > 0    # the trained model left the base
    else:
        assert g.ctx.reference is None


def test_the_anchor_without_a_base_model_is_refused_when_the_guard_is_built(eps_components):
    with pytest.raises(ValueError, match="needs the base model"):
        _guard(eps_components, None, weight=0.5)      # no adapters, no frozen copy
    assert _guard(eps_components, None, weight=0.0)[0].anchor_weight == 0.0
