"""Per-caption references of the anisotropy gate (memreg/guards/anisotropy_gate/reference.py, guard.reference):
hand-computed growth, MAD threshold, firing rates; cache = base model on the same noise; state; trainer."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from memreg import log_tags as tags
from memreg.guards import GuardContext, build_guard
from memreg.guards.anisotropy_gate.counters import fire_rates
from memreg.guards.anisotropy_gate.loss import penalty
from memreg.guards.anisotropy_gate.probes import ProbeResult, caption_latents
from memreg.guards.anisotropy_gate.reference import (
    BaseReferenceCache,
    PopulationThreshold,
    Reference,
    duplicated_captions,
)
from memreg.guards.anisotropy_gate.threshold import Calibration, Calibrator
from memreg.score import make_scorer, prompt_seed

REPO = Path(__file__).resolve().parents[2]


def _training_helpers():
    """tests/training/conftest.py's run helpers (imported by path: tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_training_conftest", REPO / "tests/training/conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- pure helpers, by hand

def test_caption_latents_are_the_captions_own_seeded_draws():
    shape = (4, 8, 8)
    x = caption_latents(["a cat", "a dog", "a cat"], [1, 0, 0], draws=2, seed=7, shape=shape)
    cat = torch.randn((2, *shape), generator=torch.Generator().manual_seed(prompt_seed(7, "a cat")))
    dog = torch.randn((2, *shape), generator=torch.Generator().manual_seed(prompt_seed(7, "a dog")))
    assert torch.equal(x[0], cat[1]) and torch.equal(x[1], dog[0]) and torch.equal(x[2], cat[0])
    alone = caption_latents(["a dog"], [0], draws=2, seed=7, shape=shape)   # independent of the batch
    assert torch.equal(alone[0], x[1])


def test_population_threshold_is_median_plus_k_mad():
    pop = PopulationThreshold(k=3.0, window=5, min_count=4)
    pop.update(torch.tensor([0.0, 1.0, float("nan")]))
    assert pop.threshold() == math.inf                       # 2 finite values < min_count
    pop.update(torch.tensor([0.2, 0.3, 0.1]))
    # [0, 1, 0.2, 0.3, 0.1]: median 0.2, |dev| [0.2, 0.8, 0, 0.1, 0.1] -> MAD 0.1
    assert pop.threshold() == pytest.approx(0.2 + 3 * 1.4826 * 0.1)
    pop.update(torch.tensor([0.5, 0.6]))                     # window 5: [0.2, 0.3, 0.1, 0.5, 0.6]
    # median 0.3, |dev| [0.1, 0, 0.2, 0.2, 0.3] -> MAD 0.2
    assert pop.threshold() == pytest.approx(0.3 + 3 * 1.4826 * 0.2)


def test_keyed_population_keeps_each_captions_latest_value():
    pop = PopulationThreshold(k=0.0, window=3, min_count=1)
    pop.update(torch.tensor([1.0, 2.0, 3.0]), keys=torch.tensor([10, 11, 10]))   # caption 10 twice: its last, 3
    assert pop.buffer.tolist() == [2.0, 3.0] and pop.keys.tolist() == [11, 10]
    pop.update(torch.tensor([5.0, float("nan"), 7.0]), keys=torch.tensor([11, 12, 13]))   # 11 replaced, nan dropped
    assert pop.buffer.tolist() == [3.0, 5.0, 7.0] and pop.keys.tolist() == [10, 11, 13]
    pop.update(torch.tensor([9.0]))                                  # unkeyed: appended, window of 3
    assert pop.buffer.tolist() == [5.0, 7.0, 9.0] and pop.keys.tolist() == [11, 13, -1]
    assert pop.threshold() == 7.0                                    # median, k = 0


def test_reference_threshold_per_mode():
    assert Reference("base", margin=0.3).threshold() == 0.3
    for mode, expected in (("population", 0.2), ("base+population", 0.5)):
        ref = Reference(mode, margin=0.5, k=0.0, window=8, min_count=1)
        ref.population.update(torch.tensor([0.1, 0.2, 0.3]))      # median 0.2, k = 0
        assert ref.threshold() == pytest.approx(expected)
    with pytest.raises(ValueError, match="reference"):
        Reference("none")


def _relative_penalty(quantity, threshold, known, zscore="none", calibrator=None):
    """The base reference's penalty on ``quantity`` (a growth: base values 0) with the bar ``threshold``."""
    ref = Reference("base", margin=threshold, zscore=zscore, calibrator=calibrator)
    probe = SimpleNamespace(base=torch.zeros(quantity.shape[0]), known=known)
    verdict = ref.compare(quantity, probe)
    return penalty("hinge", verdict), verdict.over


def test_relative_penalty_hinge_on_growth_by_hand():
    growth = torch.tensor([0.1, 0.5, 0.9, 2.0], requires_grad=True)
    known = torch.tensor([True, True, True, False])
    loss, over = _relative_penalty(growth, 0.4, known)
    # relu(g - 0.4) = [0, 0.1, 0.5, (1.6: no base value, not counted)] -> 0.6 / 4
    assert loss.item() == pytest.approx(0.15)
    assert over.tolist() == [False, True, True, False]
    loss.backward()
    assert growth.grad.tolist() == pytest.approx([0.0, 0.25, 0.25, 0.0])
    loss_inf, over_inf = _relative_penalty(growth, math.inf, known)   # population not warmed up
    assert loss_inf.item() == 0.0 and not over_inf.any()


def test_relative_penalty_calib_divides_by_the_calibration_std():
    cal = Calibrator(tau=0.0)
    cal.set_calibration(Calibration(tau=0.0, mu=5.0, sigma=2.0, ref_norm=1.0, num_values=4, quantile=0.95,
                                    frac_over=0.0))
    loss, _ = _relative_penalty(torch.tensor([1.0, 0.0]), 0.2, torch.tensor([True, True]), "calib", cal)
    assert loss.item() == pytest.approx((0.8 / 2) / 2)   # mu does not enter a difference


def test_fire_rates_on_a_planted_case():
    over = torch.tensor([True, False, True, False, False, False])
    dup = torch.tensor([True, True, False, False, False, False])
    assert fire_rates(over, dup) == {"duplicated": 0.5, "ordinary": 0.25}    # 1 of 2, 1 of 4
    assert fire_rates(over[1:], dup[1:]) == {"duplicated": 0.0, "ordinary": 0.25}
    assert fire_rates(over[2:], dup[2:]) == {"ordinary": 0.25}    # no duplicated probe: left out


def test_cache_build_sharded_over_two_processes_equals_one_process():
    caps = ["a", "bb", "ccc", "dddd", "eeeee"]

    def score(chunk):   # (draws=2, n): value = len(caption) + 10 * draw
        return torch.tensor([[len(c) + 10.0 * d for c in chunk] for d in range(2)])

    one = BaseReferenceCache(draws=2, seed=0)
    one.build(caps, score)
    assert one.values.tolist() == [[len(c), len(c) + 10.0] for c in caps]
    padded = caps + [caps[-1]]                     # 5 captions padded to 6 for 2 processes

    def gather(_mine):   # what accelerate.gather returns: process 0's shard, then process 1's
        return torch.cat([score(padded[p::2]).T.reshape(-1) for p in range(2)])

    for rank in range(2):
        two = BaseReferenceCache(draws=2, seed=0)
        two.build(caps, score, process_index=rank, num_processes=2, gather=gather)
        assert two.captions == caps and torch.equal(two.values, one.values)
    vals, known = one.lookup(["ccc", "zzz", "a"], torch.tensor([1, 0, 0]))
    assert vals.tolist() == [13.0, 0.0, 1.0] and known.tolist() == [True, False, True]


def _png(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def test_duplicated_captions_are_those_of_repeated_images(tmp_path):
    a, b, c = _png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 1), _png(tmp_path / "c.png", 2)
    recs = [{"image": a, "caption": "the photo"}, {"image": b, "caption": "a scene"},
            {"image": a, "caption": ["the photo, again", "the photo"]}, {"image": c, "caption": "another scene"}]
    assert duplicated_captions(recs) == {"the photo", "the photo, again"}
    assert duplicated_captions(recs, min_count=3) == frozenset()


# ---------------------------------------------------------------------------- the guard on the tiny UNet

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def _guard(c, unet=None, **cfg):
    from memreg.encoding import PromptEncoder

    enc = PromptEncoder(c.tokenizer, c.text_encoder)
    ctx = GuardContext(unet=unet or c.unet, noise_scheduler=c.scheduler, encode=lambda caps: enc(caps),
                       uncond=enc.uncond, latent_shape=(4, 16, 16), train_captions=CAPTIONS, seed=11,
                       duplicated_captions=lambda: {"a red circle"})
    base = {"type": "penalty", "reference": "base", "zscore": "none", "every_n_steps": 1, "probes_per_step": 4,
            "gate": False, "penalty": "score", "weight": 0.1, "population_k": 3.0,
            "calibration_prompts": 4, "calibration_seeds": 1}
    return build_guard({**base, **cfg}, ctx), enc


def _probe_step(guard, enc, unet, step=0):
    """One guard step in measure style: captions -> extra inputs -> no-grad UNet on them -> loss."""
    from memreg.guards import GuardBatch

    caps = guard.captions(list(CAPTIONS))
    embeds = enc(caps)
    extra = guard.extra_inputs(step, embeds, caps)
    with torch.no_grad():
        out = unet(extra.sample, extra.timesteps, encoder_hidden_states=extra.embeds).sample
    per = torch.zeros(len(caps))
    return guard.loss(GuardBatch(step, None, None, embeds, None, per, extra_out=out, captions=caps)), guard._outs[-1]


def test_cache_is_the_base_norm_on_each_captions_noise_and_growth_is_by_hand(eps_components):
    c = eps_components
    guard, enc = _guard(c, term="auto", reference_draws=2, reference_margin=0.05)
    assert guard.probes.signal == "norm" and guard.threshold.source == "cache"   # no LoRA: cached
    guard.calibrate()
    scorer = make_scorer(c.unet, c.scheduler)
    cond = enc(CAPTIONS)
    with torch.no_grad():
        for d in range(2):
            x = caption_latents(CAPTIONS, [d] * 4, 2, 11, (4, 16, 16))
            hand = scorer.g1 * scorer(x, cond, enc.uncond()).norm
            assert torch.allclose(guard.threshold.cache.values[:, d], hand, atol=1e-5)
    # the trained forward on the same model and the same per-caption noise: growth 0
    _, pout = _probe_step(guard, enc, c.unet)
    assert torch.allclose(pout.growth, torch.zeros(4), atol=1e-5) and not pout.over.any()
    # a changed model: growth = its norm minus the cached base norm, both by hand on the probe's noise
    tuned = copy.deepcopy(c.unet)
    with torch.no_grad():
        tuned.conv_out.weight.mul_(3.0)
    _, pout = _probe_step(guard, enc, tuned, step=1)
    assert pout.duplicated is not None and int(pout.duplicated.sum()) == 1   # 'a red circle' probed once
    assert torch.all(pout.growth > 0.05) and pout.over.all()


def test_growth_by_hand_with_a_tuned_model(eps_components):
    c = eps_components
    guard, enc = _guard(c, term="norm", reference_draws=1)
    guard.calibrate()
    tuned = copy.deepcopy(c.unet)
    with torch.no_grad():
        tuned.conv_out.weight.mul_(2.0)
    res, pout = _probe_step(guard, enc, tuned)
    probe_caps = [CAPTIONS[i] for i in range(4)]   # probes_per_step = batch: a permutation of the batch
    scorer_t, scorer_b = make_scorer(tuned, c.scheduler), make_scorer(c.unet, c.scheduler)
    with torch.no_grad():
        x = caption_latents(probe_caps, [0] * 4, 1, 11, (4, 16, 16))
        growth = (scorer_t(x, enc(probe_caps), enc.uncond()).norm - scorer_b(x, enc(probe_caps), enc.uncond()).norm)
    assert sorted(pout.growth.tolist()) == pytest.approx(sorted(growth.tolist()), abs=1e-5)
    assert res.loss.item() == pytest.approx(0.1 * float(torch.relu(growth).mean()), rel=1e-4)   # weight 0.1


def test_step_logs_fire_rates_threshold_and_cond_ratio_on_planted_outputs(eps_components):
    guard, _ = _guard(eps_components, reference="base+population", population_min=1, reference_margin=0.1)
    guard.calibrator.set_calibration(Calibration(tau=1.0, mu=0, sigma=1, ref_norm=2.0, num_values=4, quantile=0.95,
                                              frac_over=0))
    guard.threshold.population.update(torch.tensor([0.0, 0.02, 0.04]))   # median 0.02, MAD 0.02
    z = torch.zeros(())
    guard._outs = [ProbeResult(loss=z, weighted=z, values=torch.tensor([1.0, 1.0, 1.0, 1.0]),
                                 norm=torch.tensor([3.0, 1.0, 2.0, 5.0]), over=torch.tensor([True, False, False, True]),
                                 growth=torch.tensor([0.9, 0.0, 0.05, 0.5]),
                                 duplicated=torch.tensor([True, True, False, False]))]
    logs = guard.step_logs({"train/loss_mse": 0.0})
    assert logs[tags.guard_fire_rate("duplicated")] == 0.5 and logs[tags.guard_fire_rate("ordinary")] == 0.5
    assert logs[tags.GUARD_THRESHOLD] == pytest.approx(max(0.1, 0.02 + 3 * 1.4826 * 0.02))
    assert logs[tags.GUARD_GROWTH_MEAN] == pytest.approx((0.9 + 0.0 + 0.05 + 0.5) / 4)
    assert logs[tags.GUARD_COND_RATIO] == pytest.approx(((1.0 + 2.0) / 2) / 2.0)   # probes not fired on
    assert guard.counters.fire_counts.tolist() == [1.0, 2.0, 1.0, 2.0]
    assert guard.counters.totals() == {"fire_rate_duplicated": 0.5, "fire_rate_ordinary": 0.5}


def test_state_roundtrip_through_the_checkpoint_files(eps_components, tmp_path):
    from memreg.training.checkpoint import load_guard_state, save_guard_state

    c = eps_components
    kw = dict(reference="base+population", population_min=1, reference_draws=2)
    a, enc = _guard(c, **kw)
    a.calibrate()
    _probe_step(a, enc, c.unet)
    a.counters.fire_counts += torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    save_guard_state({"penalty": a}, tmp_path, rank=0)
    b, _ = _guard(c, **kw)
    load_guard_state({"penalty": b}, tmp_path, rank=0)
    assert b.threshold.cache.captions == a.threshold.cache.captions
    assert torch.equal(b.threshold.cache.values, a.threshold.cache.values)
    assert torch.equal(b.threshold.population.buffer, a.threshold.population.buffer)
    assert b.threshold.threshold() == a.threshold.threshold() and torch.equal(b.counters.fire_counts,
                                                                              a.counters.fire_counts)
    b.calibrate()                                    # resumed: nothing recomputed
    assert torch.equal(b.threshold.cache.values, a.threshold.cache.values)
    _, pa = _probe_step(a, enc, c.unet, step=1)
    _, pb = _probe_step(b, enc, c.unet, step=1)
    assert torch.equal(pa.growth, pb.growth) and torch.equal(pa.values, pb.values)


@pytest.mark.parametrize("bad, match", [({"reference": "basic"}, "guard.reference"),
                                        ({"reference": "base", "zscore": "batch"}, "zscore"),
                                        ({"reference": "base", "tau_ema": 0.5}, "tau_ema"),
                                        ({"population_min": 0}, "population_min"),
                                        ({"reference_source": "copy"}, "reference_source")])
def test_bad_reference_keys_fail_with_the_key_named(bad, match):
    from memreg.guards import guard_config

    with pytest.raises(Exception, match=match):
        guard_config({"type": "penalty", **bad})


# ---------------------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def dup_data(tmp_path_factory) -> Path:
    """The training tests' 8 images plus 3 pixel copies of img_0 (caption 'a red circle')."""
    h = _training_helpers()
    root = h.make_imagefolder(tmp_path_factory.mktemp("dup_data"))
    lines = (root / "metadata.jsonl").read_text().splitlines()
    for j in range(3):
        (root / f"copy_{j}.png").write_bytes((root / "img_0.png").read_bytes())
        lines.append(json.dumps({"file_name": f"copy_{j}.png", "text": ["a red circle"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


REF_ON = dict(guard__type="penalty", guard__gate=False, guard__every_n_steps=1, guard__probes_per_step=2, guard__term="auto",
              guard__reference="base+population", guard__population_min=1, guard__calibration_prompts=4,
              guard__calibration_seeds=1, checkpointing_steps=2)


def test_weight_zero_in_reference_mode_reproduces_the_plain_run(tiny_sd_eps, dup_data, tmp_path):
    h = _training_helpers()
    h.run(tiny_sd_eps, dup_data, tmp_path / "plain", steps=4, checkpointing_steps=2)
    res = h.run(tiny_sd_eps, dup_data, tmp_path / "w0", steps=4, guard__weight=0.0, guard__reference_source="forward",
                **REF_ON)
    assert res.guard.probe_forward == "measure" and res.guard.threshold.source == "forward"   # LoRA adapters off
    assert all(tags.GUARD_THRESHOLD in log for log in res.logs)     # probes really ran every step
    assert any(tags.guard_fire_rate("ordinary") in log for log in res.logs)
    assert res.guard.ctx.duplicated_captions == {"a red circle"}
    a, b = h.lora_weights(tmp_path / "plain"), h.lora_weights(tmp_path / "w0")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_cached_reference_and_population_resume_exactly(tiny_sd_eps, dup_data, tmp_path):
    h = _training_helpers()
    kw = dict(REF_ON, guard__penalty="score", guard__weight=1.0, guard__reference_source="cache", guard__zscore="none")
    straight = h.run(tiny_sd_eps, dup_data, tmp_path / "straight", steps=4, **kw)
    h.run(tiny_sd_eps, dup_data, tmp_path / "killed", steps=4, stop_at_step=2, **kw)
    resumed = h.run(tiny_sd_eps, dup_data, tmp_path / "killed", steps=4, resume_from_checkpoint="latest", **kw)
    s, r = straight.guard, resumed.guard
    assert s.threshold.source == "cache" and len(s.threshold.cache) == 10  # 8 records, 2 with 2 captions
    assert torch.equal(s.threshold.cache.values, r.threshold.cache.values)
    pop = s.threshold.population                                           # 2 probes x 4 steps, one value per caption
    assert 2 <= pop.buffer.numel() <= 8 and pop.keys.unique().numel() == pop.buffer.numel()
    assert torch.equal(pop.keys, r.threshold.population.keys)
    assert torch.equal(s.threshold.population.buffer, r.threshold.population.buffer)
    assert torch.equal(s.counters.fire_counts, r.counters.fire_counts)
    a, b = h.lora_weights(tmp_path / "straight"), h.lora_weights(tmp_path / "killed")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


@pytest.mark.distributed
def test_two_processes_share_one_cache_and_one_population(tiny_sd_eps, dup_data, tmp_path):
    """gloo DDP through accelerate launch (as tests/training/test_distributed.py): the sharded cache
    and the gathered population are the same on both processes, the cache as one process builds it."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    h = _training_helpers()
    out = tmp_path / "ddp_ref"
    kw = dict(REF_ON, guard__reference_source="cache", guard__penalty="score", guard__weight=1.0, train_batch_size=2)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29523",
           str(REPO / "train" / "train.py"), *h.base_argv(tiny_sd_eps, dup_data, out, steps=2, **kw)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    states = [load_file(str(out / "checkpoint-2" / f"guard_state_{r}.safetensors")) for r in (0, 1)]
    metas = [json.loads((out / "checkpoint-2" / f"guard_state_{r}.json").read_text()) for r in (0, 1)]
    keys = [k for k in states[0] if ".reference." in k or k.endswith("fire_counts")]
    assert len(keys) == 4 and metas[0]["penalty"]["reference"]["cache"]["captions"] == \
        metas[1]["penalty"]["reference"]["cache"]["captions"]
    for k in keys:
        assert torch.equal(states[0][k], states[1][k]), k
    buffer, pop_keys = (states[0][f"penalty.reference.population.{k}"] for k in ("buffer", "keys"))
    assert 2 <= buffer.numel() <= 8 and pop_keys.unique().numel() == buffer.numel()   # 2 probes x 2 proc. x 2 steps,
                                                                                      # one value per caption
    single = h.run(tiny_sd_eps, dup_data, tmp_path / "one", steps=1, **dict(kw, stop_at_step=1)).guard
    ddp_caps = metas[0]["penalty"]["reference"]["cache"]["captions"]
    assert ddp_caps == single.threshold.cache.captions
    assert torch.allclose(states[0]["penalty.reference.cache.values"], single.threshold.cache.values, atol=1e-5)
