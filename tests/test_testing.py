"""memreg/testing.py: the offline tiny SD pipeline is complete and loads like a hub checkpoint."""

import json

import torch

from memreg.testing import learn_bpe_merges


def test_pipeline_dir_has_every_component(tiny_sd_eps):
    index = json.loads((tiny_sd_eps / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_eps / sub).is_dir()
    assert (tiny_sd_eps / "tokenizer" / "vocab.json").is_file()
    assert (tiny_sd_eps / "tokenizer" / "merges.txt").is_file()
    assert list((tiny_sd_eps / "unet").glob("*.safetensors"))
    sched = json.loads((tiny_sd_eps / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler"
    assert (sched["num_train_timesteps"], sched["beta_schedule"], sched["steps_offset"]) == (1000, "scaled_linear", 1)
    assert (sched["beta_start"], sched["beta_end"]) == (0.00085, 0.012)


def test_tokenizer_ids_are_right(tiny_sd_eps):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_sd_eps), subfolder="tokenizer")
    vocab = json.loads((tiny_sd_eps / "tokenizer" / "vocab.json").read_text())
    assert tok.model_max_length == 77
    assert tok.bos_token_id == vocab["<|startoftext|>"]
    assert tok.eos_token_id == vocab["<|endoftext|>"]
    red, blue = tok("red").input_ids, tok("blue").input_ids
    assert red[0] == blue[0] == tok.bos_token_id and red[-1] == blue[-1] == tok.eos_token_id
    assert red[1:-1] == [vocab["red</w>"]] and blue[1:-1] == [vocab["blue</w>"]]
    assert red != blue
    # An unseen word falls back to byte-level pieces, each a real vocab entry.
    pieces = tok.convert_ids_to_tokens(tok("zyx").input_ids[1:-1])
    assert "".join(pieces) == "zyx</w>"
    assert tok("Red").input_ids == red  # lower-cased like CLIP


def test_bpe_merges_by_hand():
    # "aab" x1 and "ab" x1: pair (a, b</w>) occurs twice, (a, a) once -> merged first.
    merges = learn_bpe_merges(["aab", "ab"], 2)
    assert merges[0] == ("a", "b</w>")
    assert merges[1] == ("a", "ab</w>")


def test_stable_diffusion_pipeline_loads_and_generates(tiny_sd_v):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_v))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    assert 3e5 < n_params < 2e6
