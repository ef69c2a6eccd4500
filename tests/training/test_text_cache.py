"""memreg.training.text_cache: each caption encoded once and alone, LRU beyond the bound, the same
training as without it (to float rounding), resume exact with it, refused with a trained encoder."""

from __future__ import annotations

import pytest
import torch

from memreg.training.text_cache import TextEmbeddingCache

from .conftest import lora_weights, run


class CountingEncoder:
    """caption -> one row [len(caption), first letter's code]; records what it was asked."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, caps):
        self.calls.append(list(caps))
        return torch.tensor([[float(len(c)), float(ord(c[0]) if c else 0)] for c in caps])


def test_each_caption_is_encoded_once_and_alone_in_batch_order():
    enc = CountingEncoder()
    cache = TextEmbeddingCache(enc, max_captions=8)
    out = cache(["ab", "c", "ab"])
    assert enc.calls == [["ab"], ["c"]]
    assert torch.equal(out, torch.tensor([[2.0, 97.0], [1.0, 99.0], [2.0, 97.0]]))
    cache(["c", ""])
    assert enc.calls == [["ab"], ["c"], [""]] and (cache.hits, cache.misses) == (2, 3)


def test_least_recently_used_caption_leaves_first():
    enc = CountingEncoder()
    cache = TextEmbeddingCache(enc, max_captions=2)
    cache(["a", "b"])
    cache(["a"])           # a is now the most recent
    cache(["c"])           # b leaves
    assert list(cache.rows) == ["a", "c"]
    cache(["b"])           # b again is a miss, a leaves
    assert enc.calls[-1] == ["b"] and list(cache.rows) == ["c", "b"]
    with pytest.raises(ValueError, match="max_captions"):
        TextEmbeddingCache(enc, max_captions=0)


def test_cached_rows_match_the_batched_encoder(tiny_sd_eps):
    from memreg.families import prompt_encoder
    from memreg.models import load_components

    enc = prompt_encoder(load_components(str(tiny_sd_eps)))
    caps = ["a red circle", "a blue square and a white cross", "", "a red circle"]
    with torch.no_grad():
        batched = enc(caps)
    cached = TextEmbeddingCache(enc, max_captions=16)(caps)
    assert cached.shape == batched.shape
    assert torch.allclose(cached, batched, atol=1e-5)


def test_training_with_the_cache_matches_and_resumes_exactly(plain_run, tiny_sd_eps, tiny_data, tmp_path):
    full_out, _ = plain_run   # the same 4 LoRA steps without the cache
    cached = tmp_path / "cached"
    run(tiny_sd_eps, tiny_data, cached, steps=4, checkpointing_steps=2, cache_text_embeddings=64)
    a, b = lora_weights(full_out), lora_weights(cached)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    killed = tmp_path / "killed"
    run(tiny_sd_eps, tiny_data, killed, steps=4, checkpointing_steps=2, cache_text_embeddings=64, stop_at_step=2)
    run(tiny_sd_eps, tiny_data, killed, steps=4, checkpointing_steps=2, cache_text_embeddings=64,
        resume_from_checkpoint="latest")
    c = lora_weights(killed)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_the_cache_is_refused_with_a_trained_text_encoder(tiny_sd_eps, tiny_data, tmp_path):
    from memreg.errors import MemregError
    from memreg.training.config import load_config

    from .conftest import base_argv

    with pytest.raises(MemregError, match="cache_text_embeddings keeps a frozen text encoder"):
        load_config(base_argv(tiny_sd_eps, tiny_data, tmp_path / "o", cache_text_embeddings=8,
                              train_text_encoder="true"))
    with pytest.raises(MemregError, match="cache_text_embeddings=-1 must be >= 0"):
        load_config(base_argv(tiny_sd_eps, tiny_data, tmp_path / "o", cache_text_embeddings=-1))
