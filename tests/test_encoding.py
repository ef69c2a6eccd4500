"""memreg/encoding.py: batched prompt encoding, cached empty prompt, truncation flags."""

import torch

from memreg.encoding import PromptEncoder

PROMPTS = ["a red circle on a blue background", "a photo of a dog", "the moon at night"]


def test_encoder_matches_direct_text_encoder_calls(eps_components):
    tok, te = eps_components.tokenizer, eps_components.text_encoder
    enc = PromptEncoder(tok, te)
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        direct = te(ids)[0]
        empty = te(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    out = enc.encode(PROMPTS, batch_size=2)
    assert out.embeds.shape == (3, 77, te.config.hidden_size)
    torch.testing.assert_close(out.embeds, direct)
    assert out.truncated == [False, False, False]
    assert enc.uncond() is enc.uncond()
    torch.testing.assert_close(enc.uncond(), empty)


def test_long_prompts_are_truncated_and_flagged(eps_components):
    enc = PromptEncoder(eps_components.tokenizer, eps_components.text_encoder)
    long = " ".join(["circle"] * 100)
    out = enc.encode([long, "a dog"])
    assert out.truncated == [True, False]
    assert out.embeds.shape[1] == 77
