"""Anti-gradient control (memreg/guards/agc.py): mask, loss, running averages by hand; DDP agreement; state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memreg.guards import GuardBatch, GuardContext
from memreg.guards.agc import AntiGradientControl


def _ctx(gather=None, n_timesteps: int = 10) -> GuardContext:
    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=n_timesteps, prediction_type="epsilon"))
    kw = {"gather": gather} if gather is not None else {}
    return GuardContext(unet=None, noise_scheduler=sched, encode=None, uncond=None, latent_shape=(4, 8, 8), **kw)


def _batch(losses, timesteps, step: int = 0) -> GuardBatch:
    per = torch.tensor(losses, dtype=torch.float32, requires_grad=True)
    t = torch.tensor(timesteps)
    return GuardBatch(step=step, noisy=None, timesteps=t, embeds=None, model_pred=None, per_sample=per)


def test_mask_loss_and_averages_by_hand():
    g = AntiGradientControl(_ctx(), mem_ratio=1.25, decay=0.8)
    # step 1: all averages are 0, so every sample is kept: loss = mean
    b = _batch([1.0, 0.5, 2.0], [3, 3, 5])
    out = g.loss(b)
    assert out.loss.item() == pytest.approx(3.5 / 3)
    # per sample, in order: avg[3] = 0.2 * 1.0 = 0.2, then 0.8 * 0.2 + 0.2 * 0.5 = 0.26; avg[5] = 0.2 * 2.0 = 0.4
    assert g.avg[3].item() == pytest.approx(0.26) and g.avg[5].item() == pytest.approx(0.4)
    assert g.avg.sum().item() == pytest.approx(0.66)
    # step 2: 0.25 * 1.25 = 0.3125 >= 0.26 kept; 0.4 * 1.25 = 0.5 >= 0.4 kept; 0.2 * 1.25 = 0.25 < 0.4 dropped
    b = _batch([0.25, 0.4, 0.2], [3, 5, 5])
    out = g.loss(b)
    assert out.loss.item() == pytest.approx((0.25 + 0.4) / 2)   # = mean(l * mask) * batch / kept
    out.loss.backward()
    assert b.per_sample.grad.tolist() == pytest.approx([0.5, 0.5, 0.0])
    # avg[3] = 0.8 * 0.26 + 0.2 * 0.25 = 0.258; avg[5] = 0.8 * 0.4 + 0.2 * 0.4 = 0.4, then 0.8 * 0.4 + 0.2 * 0.2 = 0.36
    assert g.avg[3].item() == pytest.approx(0.258) and g.avg[5].item() == pytest.approx(0.36)
    assert g.step_logs({})["guard/agc_kept_frac"] == pytest.approx(5 / 6)


def test_mask_uses_the_average_before_this_batch_updates_it():
    g = AntiGradientControl(_ctx(), mem_ratio=1.25, decay=0.8)
    g.avg[7] = 1.0
    # before the update: 0.78 * 1.25 = 0.975 < 1.0 -> dropped; (after it, avg would be 0.956 and it would be kept)
    out = g.loss(_batch([0.78, 2.0], [7, 2]))
    assert out.loss.item() == pytest.approx(2.0)
    assert g.avg[7].item() == pytest.approx(0.8 * 1.0 + 0.2 * 0.78)


def test_nothing_kept_gives_zero_loss_with_zero_gradient():
    g = AntiGradientControl(_ctx(), mem_ratio=1.0, decay=0.5)
    g.avg[1] = 5.0
    b = _batch([1.0, 2.0], [1, 1])
    out = g.loss(b)
    out.loss.backward()
    assert out.loss.item() == 0.0 and b.per_sample.grad.abs().sum().item() == 0.0


def test_processes_agree_on_the_averages():
    """Two simulated processes: each gathers (rank 0's, rank 1's) samples and updates in that order."""
    data = {0: ([1.0, 3.0], [4, 4]), 1: ([2.0, 5.0], [4, 6])}

    def gather_for(rank):
        def gather(x):
            pos = 0 if x.is_floating_point() else 1
            parts = [torch.tensor(data[r][pos], dtype=x.dtype) for r in (0, 1)]
            parts[rank] = x
            return torch.cat(parts)
        return gather

    guards = [AntiGradientControl(_ctx(gather_for(r)), decay=0.5) for r in (0, 1)]
    for r, g in enumerate(guards):
        g.loss(_batch(*data[r]))
    # avg[4]: 0.5 * 1.0 = 0.5 -> 0.5 * 0.5 + 0.5 * 3.0 = 1.75 -> 0.5 * 1.75 + 0.5 * 2.0 = 1.875; avg[6] = 2.5
    for g in guards:
        assert g.avg[4].item() == pytest.approx(1.875) and g.avg[6].item() == pytest.approx(2.5)
    assert torch.equal(guards[0].avg, guards[1].avg)


def test_state_roundtrip_and_mismatch():
    a = AntiGradientControl(_ctx())
    a.loss(_batch([1.0, 2.0], [0, 9]))
    b = AntiGradientControl(_ctx())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.avg, b.avg)
    with pytest.raises(ValueError, match="10"):
        AntiGradientControl(_ctx(n_timesteps=20)).load_state_dict(a.state_dict())


def test_invalid_settings():
    with pytest.raises(ValueError, match="mem_ratio"):
        AntiGradientControl(_ctx(), mem_ratio=0.0)
    with pytest.raises(ValueError, match="decay"):
        AntiGradientControl(_ctx(), decay=1.0)
