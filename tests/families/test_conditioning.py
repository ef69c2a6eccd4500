"""memreg/families/conditioning.py and the guard protocol's fused forward: added conditioning is
batched row for row with the embeddings."""

from __future__ import annotations

import pytest
import torch

from memreg.families import Conditioning, cat_conditioning, embeds_of, unconditional_for, unet_kwargs, with_embeds
from memreg.guards import ExtraInputs, concat_inputs, split_output


def _cond(rows: list[float]) -> Conditioning:
    """Row r: embeds filled with r, text_embeds (r, -r), time_ids r * (1..6)."""
    r = torch.tensor(rows)
    return Conditioning(r.view(-1, 1, 1).expand(-1, 3, 2).clone(),
                        {"text_embeds": torch.stack([r, -r], 1), "time_ids": r.view(-1, 1) * torch.arange(1., 7.)})


def test_plain_tensors_concatenate_as_torch_cat():
    a, b = torch.randn(2, 3, 4), torch.randn(1, 3, 4)
    out = cat_conditioning([a, b])
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.cat([a, b]))
    assert unet_kwargs(a) == {"encoder_hidden_states": a}
    assert embeds_of(a) is a and with_embeds(a, b) is b


def test_rows_stay_together_through_cat_index_expand_and_cast():
    c = cat_conditioning([_cond([1.0, 2.0]), _cond([5.0])])
    assert c.shape == (3, 3, 2) and len(c) == 3
    assert c.added["time_ids"][:, 0].tolist() == [1.0, 2.0, 5.0]
    assert c.added["time_ids"][2].tolist() == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    picked = c[torch.tensor([2, 0])]
    assert picked.embeds[:, 0, 0].tolist() == [5.0, 1.0] and picked.added["text_embeds"].tolist() == [[5, -5], [1, -1]]
    one = _cond([7.0]).expand(4, -1, -1)
    assert one.added["time_ids"].shape == (4, 6) and one.added["text_embeds"][3].tolist() == [7.0, -7.0]
    half = c.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.added["time_ids"].dtype == torch.float16
    kw = unet_kwargs(c)
    assert kw["encoder_hidden_states"] is c.embeds and set(kw["added_cond_kwargs"]) == {"text_embeds", "time_ids"}


def test_mismatched_batches_and_fields_are_refused():
    with pytest.raises(ValueError, match="batch"):
        Conditioning(torch.zeros(2, 3, 2), {"time_ids": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match="different added fields"):
        cat_conditioning([_cond([1.0]), Conditioning(torch.zeros(1, 3, 2), {"time_ids": torch.zeros(1, 6)})])
    with pytest.raises(TypeError):
        cat_conditioning([_cond([1.0]), torch.zeros(1, 3, 2)])


def test_concat_inputs_and_split_output_round_trip_added_conditioning():
    base = (torch.zeros(2, 4, 2, 2), torch.tensor([10, 20]), _cond([1.0, 2.0]))
    extra = ExtraInputs(torch.ones(3, 4, 2, 2), torch.tensor([30, 40, 50]), _cond([3.0, 4.0, 5.0]))
    sample, t, cond = concat_inputs(base, extra)
    assert t.tolist() == [10, 20, 30, 40, 50]
    assert cond.added["time_ids"][:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert cond.added["text_embeds"][:, 1].tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0]
    # a stand-in denoiser that returns each row's first time id: the split hands each part its own rows
    out = cond.added["time_ids"][:, 0].view(-1, 1, 1, 1) + sample
    pred, extra_out = split_output(out, 2)
    assert pred.flatten(1)[:, 0].tolist() == [1.0, 2.0] and extra_out.flatten(1)[:, 0].tolist() == [4.0, 5.0, 6.0]


def test_the_empty_prompt_takes_each_rows_time_ids_and_keeps_its_own_text_parts():
    """Wen's filter and any eps(c) - eps(empty) on a training batch: the rows' size/crop time ids,
    the empty prompt's embeddings and pooled embedding."""
    uncond = Conditioning(torch.zeros(1, 3, 2), {"text_embeds": torch.full((1, 4), 7.0),
                                                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    cond = Conditioning(torch.ones(2, 3, 2), {"text_embeds": torch.ones(2, 4),
                                              "time_ids": torch.tensor([[96.0, 80, 8, 0, 64, 64],
                                                                        [64.0, 64, 0, 0, 64, 64]])})
    u = unconditional_for(uncond, cond)
    assert torch.equal(u.embeds, torch.zeros(2, 3, 2))
    assert torch.equal(u.added["text_embeds"], torch.full((2, 4), 7.0))
    assert u.added["time_ids"].tolist() == [[96, 80, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    plain = unconditional_for(torch.zeros(1, 3, 2), torch.ones(5, 3, 2))   # SD: the expansion, nothing else
    assert plain.shape == (5, 3, 2) and not plain.any()
