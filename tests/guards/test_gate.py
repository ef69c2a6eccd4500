"""The caption gate (memreg/guards/anisotropy_gate/gate.py, guard.gate): flags by hand, the weighted
denoising loss by hand, the per-group gate rates, checkpoint state, config errors, the trainer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from memreg import log_tags as tags
from memreg.guards import GuardBatch, GuardContext, build_guard
from memreg.guards.anisotropy_gate.gate import CaptionGate, caption_keys
from memreg.score import prompt_seed

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle", "a blue square", "a green cross", "a red circle"]


def test_caption_keys_are_the_63_bit_prompt_seeds():
    keys = caption_keys(["a cat", "a dog", "a cat"])
    assert keys.dtype == torch.int64
    assert keys.tolist() == [prompt_seed(0, "a cat"), prompt_seed(0, "a dog"), prompt_seed(0, "a cat")]


@pytest.mark.parametrize("release, flagged_after", [(True, {2}), (False, {1, 2})])
def test_flags_are_set_by_a_fired_probe_and_released_by_one_under(release, flagged_after):
    gate = CaptionGate(weight=0.0, release=release)
    gate.update(torch.tensor([1, 2, 3]), torch.tensor([True, True, False]))
    assert gate.flagged == {1, 2}
    gate.update(torch.tensor([1]), torch.tensor([False]))      # caption 1 probed again, under the threshold
    assert gate.flagged == flagged_after
    assert gate.is_flagged(torch.tensor([2, 3, 2])).tolist() == [True, False, True]


def test_weighted_mean_by_hand():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    gate = CaptionGate(weight=0.5)
    gate.flagged = {20}
    w = gate.weights(torch.tensor([10, 20, 30, 20]))
    assert w.tolist() == [1.0, 0.5, 1.0, 0.5]
    assert float(gate.weighted_mean(per, w).detach()) == pytest.approx((1 + 0.5 * 2 + 3 + 0.5 * 4) / 3.0)
    zero = CaptionGate.weighted_mean(per, torch.zeros(4))
    zero.backward()                                             # every sample gated: 0, graph kept (DDP)
    assert float(zero.detach()) == 0.0 and per.grad.tolist() == [0.0] * 4


def test_gate_weight_out_of_range_is_refused():
    with pytest.raises(ValueError, match="gate_weight"):
        CaptionGate(weight=1.0)
    from memreg.guards import guard_config

    with pytest.raises(Exception, match="guard.gate_weight"):
        guard_config({"type": "penalty", "gate": True, "gate_weight": 1.5})


# ---------------------------------------------------------------------------- in the penalty guard

def _guard(c, **cfg):
    from memreg.encoding import PromptEncoder

    enc = PromptEncoder(c.tokenizer, c.text_encoder)
    ctx = GuardContext(unet=c.unet, noise_scheduler=c.scheduler, encode=lambda caps: enc(caps), uncond=enc.uncond,
                       latent_shape=(4, 16, 16), train_captions=CAPTIONS, seed=11,
                       duplicated_captions=lambda: {"a red circle"})
    base = {"type": "penalty", "gate": True, "reference": "none", "zscore": "none", "term": "norm", "every_n_steps": 1,
            "probes_per_step": 1, "calibration_prompts": 4, "calibration_seeds": 1}
    return build_guard({**base, **cfg}, ctx), enc


def _step(guard, enc, unet, per_sample, step=0):
    caps = guard.captions(list(CAPTIONS))
    embeds = enc(caps)
    extra = guard.extra_inputs(step, embeds, caps)
    with torch.no_grad():
        out = None if extra is None else unet(extra.sample, extra.timesteps, encoder_hidden_states=extra.embeds).sample
    return guard.loss(GuardBatch(step, None, None, embeds, None, per_sample, extra_out=out, captions=caps))


def test_a_fired_probe_takes_its_caption_out_of_this_and_later_batches(eps_components):
    c = eps_components
    guard, enc = _guard(c, tau=-1e9)              # every probe fires
    guard.calibrate()
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    res = _step(guard, enc, c.unet, per)
    probed = guard._outs[-1]
    assert bool(probed.over.all()) and len(guard.gate.flagged) == 1
    (cap,) = [x for x in set(CAPTIONS) if prompt_seed(0, x) in guard.gate.flagged]
    kept = [p for x, p in zip(CAPTIONS, per.tolist()) if x != cap]
    assert float(res.loss_mse) == pytest.approx(sum(kept) / len(kept))   # this very batch is already gated
    logs = guard.step_logs({"train/loss_mse": float(res.loss_mse)})
    n_dup_gated = sum(x == cap for x in CAPTIONS if x == "a red circle")
    assert logs[tags.guard_gate_rate("duplicated")] == pytest.approx(n_dup_gated / 2)
    assert logs[tags.guard_gate_rate("ordinary")] == pytest.approx((len(CAPTIONS) - len(kept) - n_dup_gated) / 2)
    assert logs[tags.GUARD_GATE_FLAGGED] == 1.0


def test_each_image_the_gate_flags_is_logged_once_with_its_step_and_wording(eps_components, caplog):
    """tau -inf: every probe fires. A line names each image when its first probe fires (the step,
    the item key, the wording probed); an image probed again while flagged adds no line."""
    c = eps_components
    guard, enc = _guard(c, tau=-1e9)
    guard.calibrate()
    items = torch.tensor([10, 20, 30, 40])
    probed = []
    with caplog.at_level("INFO", logger="memreg.guards.anisotropy_gate.guard"):
        for step in range(6):
            _step_items(guard, enc, c.unet, CAPTIONS, items, torch.ones(4), step=step)
            probed += guard._outs[-1].keys.tolist()
            guard.step_logs({"train/loss_mse": 1.0})
    flags = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gate: step")]
    firsts = list(dict.fromkeys(probed))
    assert guard.gate.flagged == set(firsts) and len(flags) == len(firsts)
    for key, line in zip(firsts, flags):
        step = probed.index(key)                               # one probe a step
        assert line.startswith(f"gate: step {step} flagged image {key:016x} through ")
        assert repr(CAPTIONS[items.tolist().index(key)]) in line


def test_no_gate_is_the_plain_mean_and_a_high_tau_gates_nothing(eps_components):
    c = eps_components
    guard, enc = _guard(c, tau=1e9)
    guard.calibrate()
    res = _step(guard, enc, c.unet, torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert float(res.loss_mse) == pytest.approx(3.0) and not guard.gate.flagged


def test_gate_state_roundtrip_through_the_checkpoint_files(eps_components, tmp_path):
    from memreg.training.checkpoint import load_guard_state, save_guard_state

    c = eps_components
    a, enc = _guard(c, tau=-1e9, gate_release=False)
    a.calibrate()
    for step in range(2):
        _step(a, enc, c.unet, torch.ones(4), step=step)
        a.step_logs({"train/loss_mse": 1.0})
    save_guard_state({"penalty": a}, tmp_path, rank=0)
    b, _ = _guard(c, tau=-1e9, gate_release=False)
    load_guard_state({"penalty": b}, tmp_path, rank=0)
    assert b.gate.flagged == a.gate.flagged and torch.equal(b.counters.gate_counts, a.counters.gate_counts)
    assert b.counters.totals() == a.counters.totals()


# ---------------------------------------------------------------------------- the trainer

def _training_helpers():
    spec = importlib.util.spec_from_file_location("_training_conftest", REPO / "tests/training/conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return _training_helpers().make_imagefolder(tmp_path_factory.mktemp("gate_data"))


GATE_ON = dict(guard__type="penalty", guard__gate=True, guard__every_n_steps=1, guard__probes_per_step=2,
               guard__term="norm", guard__reference="none", guard__zscore="none", guard__tau=-1e9, guard__weight=0.0,
               guard__calibration_prompts=4, guard__calibration_seeds=1, checkpointing_steps=2)


def test_trainer_gates_flagged_captions_and_resumes_exactly(tiny_sd_eps, tiny_data, tmp_path):
    h = _training_helpers()
    straight = h.run(tiny_sd_eps, tiny_data, tmp_path / "straight", steps=4, **GATE_ON)
    g = straight.guard
    assert g.probe_forward == "measure" and len(g.gate.flagged) >= 2     # weight 0: the gate alone acts
    assert any(tags.guard_gate_rate("ordinary") in log for log in straight.logs)
    plain = h.run(tiny_sd_eps, tiny_data, tmp_path / "plain", steps=4, checkpointing_steps=2)
    a, p = h.lora_weights(tmp_path / "straight"), h.lora_weights(tmp_path / "plain")
    assert max(float((a[k] - p[k]).abs().max()) for k in a) > 0           # gating changed training
    h.run(tiny_sd_eps, tiny_data, tmp_path / "killed", steps=4, stop_at_step=2, **GATE_ON)
    resumed = h.run(tiny_sd_eps, tiny_data, tmp_path / "killed", steps=4, resume_from_checkpoint="latest", **GATE_ON)
    assert resumed.guard.gate.flagged == g.gate.flagged
    b = h.lora_weights(tmp_path / "killed")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_trainer_at_the_defaults_logs_the_gate_and_resumes_exactly(tiny_sd_eps, tiny_data, tmp_path):
    """guard.type penalty at its defaults: the caption gate on the base+population reference (base
    values cached at calibration, LoRA too), weight 0, every_n_steps auto. probe_share 0.5 at batch 4
    with 2 probes x (u, c) = 4 probe samples resolves to every ceil(4 / (0.5 * 4)) = 2nd step."""
    h = _training_helpers()
    kw = dict(guard__type="penalty", guard__population_min=1, guard__calibration_prompts=4,
              guard__calibration_seeds=1, checkpointing_steps=2, guard__probe_share=0.5)
    straight = h.run(tiny_sd_eps, tiny_data, tmp_path / "straight", steps=4, **kw)
    g = straight.guard
    assert g.gate is not None and g.threshold.mode == "base+population" and g.threshold.source == "cache"
    assert g.probe_forward == "measure" and g.probes.every_n_steps == 2
    assert all(tags.guard_gate_rate("ordinary") in log for log in straight.logs)
    h.run(tiny_sd_eps, tiny_data, tmp_path / "killed", steps=4, stop_at_step=2, **kw)
    resumed = h.run(tiny_sd_eps, tiny_data, tmp_path / "killed", steps=4, resume_from_checkpoint="latest", **kw)
    r = resumed.guard
    assert r.gate.flagged == g.gate.flagged and torch.equal(r.threshold.population.buffer, g.threshold.population.buffer)
    assert torch.equal(r.threshold.cache.values, g.threshold.cache.values)
    a, b = h.lora_weights(tmp_path / "straight"), h.lora_weights(tmp_path / "killed")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


# ---------------------------------------------------------------------------- what a flag names (guard.gate_key)

def _step_items(guard, enc, unet, captions, items, per_sample, step):
    embeds = enc(list(captions))
    extra = guard.extra_inputs(step, embeds, list(captions), items)
    with torch.no_grad():
        out = None if extra is None else unet(extra.sample, extra.timesteps, encoder_hidden_states=extra.embeds).sample
    return guard.loss(GuardBatch(step, None, None, embeds, None, per_sample, extra_out=out, captions=list(captions),
                                 items=items))


@pytest.mark.parametrize("gate_key", ["image", "caption"])
def test_a_flag_takes_out_every_row_of_its_image_whatever_the_caption(eps_components, gate_key):
    """Step 0 probes one row and fires (tau -inf); step 1 has no probe (every 2nd step). Its batch holds
    the probed image under a new wording, and the probed wording on a new image: with gate_key image
    only the first leaves the loss, with gate_key caption only the second."""
    c = eps_components
    guard, enc = _guard(c, tau=-1e9, every_n_steps=2, gate_key=gate_key)
    guard.calibrate()
    items = torch.tensor([10, 20, 30, 40])
    _step_items(guard, enc, c.unet, CAPTIONS, items, torch.ones(4), step=0)
    (key,) = guard._outs[-1].keys.tolist()
    assert guard.gate.flagged == {key}
    row_keys = items.tolist() if gate_key == "image" else caption_keys(CAPTIONS).tolist()
    row = row_keys.index(key)                              # the probed row (a row with its caption)
    probed_caption, probed_item = CAPTIONS[row], int(items[row])
    caps = ["a never seen wording", probed_caption + " ", probed_caption, "another new wording"]
    new_items = torch.tensor([probed_item, 50, 60, 70])   # row 0: the probed image; row 2: its caption, a new image
    res = _step_items(guard, enc, c.unet, caps, new_items, torch.tensor([1.0, 2.0, 3.0, 4.0]), step=1)
    expected = (2 + 3 + 4) / 3 if gate_key == "image" else (1 + 2 + 4) / 3
    assert float(res.loss_mse) == pytest.approx(expected)


def test_without_item_keys_the_image_gate_keys_on_captions(eps_components, caplog):
    c = eps_components
    guard, enc = _guard(c, tau=-1e9, every_n_steps=2)
    guard.calibrate()
    _step_items(guard, enc, c.unet, CAPTIONS, None, torch.ones(4), step=0)
    assert guard.gate.flagged <= set(caption_keys(CAPTIONS).tolist()) and len(guard.gate.flagged) == 1
    assert "no item keys" in caplog.text


def test_a_checkpoint_flagging_other_things_is_refused_by_name():
    from memreg.guards.anisotropy_gate.gate import GateKeyError

    old = {"flagged": torch.tensor([5], dtype=torch.int64)}          # written before the image key: captions
    with pytest.raises(GateKeyError, match="guard.gate_key: caption"):
        CaptionGate(key="image").load_state_dict(old)
    gate = CaptionGate(key="caption")
    gate.load_state_dict(old)
    assert gate.flagged == {5}
    with pytest.raises(GateKeyError, match="guard.gate_key: image"):
        CaptionGate(key="caption").load_state_dict(CaptionGate(key="image").state_dict())


def test_trainer_flags_images_by_their_content_hash(tiny_sd_eps, tiny_data, tmp_path):
    from memreg.duplicates import find_duplicates
    from memreg.training.config import load_config
    from memreg.training.data import build_train_data

    h = _training_helpers()
    res = h.run(tiny_sd_eps, tiny_data, tmp_path / "run", steps=2, **GATE_ON)
    flagged = res.guard.gate.flagged
    cfg = load_config(h.base_argv(tiny_sd_eps, tiny_data, tmp_path / "x"))
    records = build_train_data(cfg, seed=0).records("train")
    assert flagged and flagged <= set(find_duplicates(records).item_keys())
    captions = [x for r in records for x in (r["caption"] if isinstance(r["caption"], list) else [r["caption"]])]
    assert not flagged & set(caption_keys(captions).tolist())


def test_an_augmented_row_is_probed_with_its_dataset_wording(eps_components):
    """The base cache holds the dataset's wordings only; a shuffled caption is probed as its source
    wording (encoded afresh), so its base value is known and the probe can fire."""
    c = eps_components
    guard, enc = _guard(c, reference="base", reference_source="cache", probes_per_step=4, reference_margin=-1e9)
    guard.calibrate()
    shuffled = [", ".join(reversed(x.split(" "))) for x in CAPTIONS]   # strings the cache never saw
    embeds = enc(shuffled)
    guard.extra_inputs(0, embeds, shuffled, torch.tensor([1, 2, 3, 4]), list(CAPTIONS))
    probe = guard._probe
    assert sorted(probe.captions) == sorted(CAPTIONS) and bool(probe.known.all())
    unchanged, _ = _guard(c, reference="base", reference_source="cache", probes_per_step=4, reference_margin=-1e9)
    unchanged.calibrate()
    unchanged.extra_inputs(0, embeds, shuffled, torch.tensor([1, 2, 3, 4]), None)   # no sources: as before
    assert sorted(unchanged._probe.captions) == sorted(shuffled) and not bool(unchanged._probe.known.any())


def test_gate_rates_count_an_augmented_row_by_its_dataset_wording(eps_components):
    """The gated share per group follows the rows' dataset wordings: a blanked duplicated row is still
    a duplicated one (rows 0 and 3 carry the duplicated caption)."""
    c = eps_components
    guard, enc = _guard(c, tau=-1e9, every_n_steps=2)
    guard.calibrate()
    items = torch.tensor([10, 20, 30, 40])
    _step_items(guard, enc, c.unet, CAPTIONS, items, torch.ones(4), step=0)
    (key,) = guard._outs[-1].keys.tolist()
    row = items.tolist().index(key)
    guard.step_logs({"train/loss_mse": 1.0})
    blank = ["", "", "", ""]
    embeds = enc(blank)
    guard.extra_inputs(1, embeds, blank, items, list(CAPTIONS))
    guard.loss(GuardBatch(1, None, None, embeds, None, torch.ones(4), captions=blank, items=items,
                          sources=list(CAPTIONS)))
    logs = guard.step_logs({"train/loss_mse": 1.0})
    dup = CAPTIONS[row] == "a red circle"
    assert logs[tags.guard_gate_rate("duplicated")] == pytest.approx(0.5 if dup else 0.0)
    assert logs[tags.guard_gate_rate("ordinary")] == pytest.approx(0.0 if dup else 0.5)
