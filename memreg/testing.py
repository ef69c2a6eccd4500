"""Tiny, offline Stable Diffusion pipelines in diffusers format (SD 1.x/2.x and SDXL).

Tests, benchmarks and the demo use them instead of a hub checkpoint. Each has every component a
real checkpoint of its family has (UNet2DConditionModel, AutoencoderKL, CLIP text encoder(s), a
real BPE CLIPTokenizer, the DDPM scheduler config), so memreg loads it through the same code path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Words the tiny tokenizer learns merges from: generic caption vocabulary plus the demo's
# colour/shape/position words. Anything else still tokenizes, byte by byte.
_WORDS = """a an the of on in at with and or to from by for is are this that photo picture image
painting drawing portrait poster art style man woman person people dog cat horse bird car house
tree flower sky sea water mountain city street room table chair book red green blue yellow orange
purple pink black white gray grey brown circle square triangle star ring cross stripe dot background
top bottom left right center middle small large big two three one over under near next beautiful
old new dark light bright night day sunset snow rain forest river beach road garden window door
rocket coffee astronaut camera coins moon clock logo brick retina chelsea wall cup sign text""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (end-of-word marked by ``</w>``) from a word list."""
    corpus = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, freq in corpus.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged: Counter = Counter()
        for word, freq in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


def write_tiny_clip_tokenizer(out_dir: str | Path, num_merges: int = 400):
    """Write vocab.json/merges.txt for a small byte-level CLIP BPE and return the loaded tokenizer.

    Loaded with ``CLIPTokenizer.from_pretrained(dir)``: in transformers 5.x constructing it from
    ``vocab_file=`` silently mis-tokenizes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = learn_bpe_merges(_WORDS, num_merges)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_unet(sample_size: int = 16, cross_attention_dim: int = 32, unet_channels: tuple[int, ...] = (32, 64),
              attention_levels: int = 1, attention_head_dim: int = 8, linear_projection: bool = False
              ) -> UNet2DConditionModel:
    """The tiny pipeline's UNet (random weights): one level per ``unet_channels`` entry, cross-attention
    on the ``attention_levels`` lowest-resolution levels."""
    plain = len(unet_channels) - attention_levels
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attention_levels,
        up_block_types=("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=16,
        use_linear_projection=linear_projection,
    )


def build_tiny_sd(
    out_dir: str | Path,
    prediction_type: str = "epsilon",
    seed: int = 0,
    sample_size: int = 16,
    cross_attention_dim: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_downsample: bool = True,
    attention_levels: int = 1,
    text_layers: int = 2,
) -> Path:
    """Build and save a randomly initialised tiny SD pipeline; return its directory.

    ``sample_size`` is the UNet's latent size (diffusers' meaning). The VAE downsamples by 2 (images
    are ``2 * sample_size`` pixels) unless ``vae_downsample=False`` (a single-block VAE: latents at
    pixel resolution). ``unet_channels`` gives one UNet level per entry; the ``attention_levels``
    lowest-resolution levels have cross-attention. ``prediction_type="v_prediction"`` mimics SD2.x (linear projections
    in the transformer blocks).
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    out_dir = Path(out_dir)
    tok_dir = tempfile.TemporaryDirectory()
    tokenizer = write_tiny_clip_tokenizer(tok_dir.name)
    vae_levels = 2 if vae_downsample else 1
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size, cross_attention_dim, unet_channels, attention_levels,
                     linear_projection=prediction_type == "v_prediction")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=(16, 32)[:vae_levels],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=vae_levels * sample_size,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cross_attention_dim,
        intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=cross_attention_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    # Keep the slow-tokenizer files beside tokenizer.json, as hub SD checkpoints ship them.
    for name in ("vocab.json", "merges.txt"):
        (out_dir / "tokenizer" / name).write_text((Path(tok_dir.name) / name).read_text())
    tok_dir.cleanup()
    return out_dir


def build_tiny_sdxl(
    out_dir: str | Path,
    seed: int = 0,
    sample_size: int = 16,
    text_widths: tuple[int, int] = (32, 32),
    projection_dim: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    addition_time_embed_dim: int = 8,
    force_zeros_for_empty_prompt: bool = True,
    text_layers: int = 2,
) -> Path:
    """Build and save a randomly initialised tiny SDXL pipeline (``StableDiffusionXLPipeline``
    format: ``text_encoder`` a ``CLIPTextModel``, ``text_encoder_2`` a ``CLIPTextModelWithProjection``,
    a UNet with ``addition_embed_type="text_time"`` whose cross-attention width is the two encoders'
    summed hidden sizes, SDXL's scheduler betas); return its directory. The VAE downsamples by 2, so
    images are ``2 * sample_size`` pixels; ``force_zeros_for_empty_prompt`` goes to model_index.json
    (SDXL base: true)."""
    out_dir = Path(out_dir)
    tok_dir = tempfile.TemporaryDirectory()
    tokenizer = write_tiny_clip_tokenizer(tok_dir.name)
    torch.manual_seed(seed)

    def text_config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=77,
                              projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(text_config(text_widths[0]))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(text_widths[1]))
    levels = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        cross_attention_dim=sum(text_widths), attention_head_dim=8, norm_num_groups=16,
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=2 * sample_size, scaling_factor=0.13025)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                              timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            (out_dir / sub / name).write_text((Path(tok_dir.name) / name).read_text())
    tok_dir.cleanup()
    return out_dir


def accelerate_launch(num_processes: int, argv: list[str], port: int, cwd, timeout: float = 480) -> str:
    """Run ``accelerate launch [--multi_gpu] --num_processes N ARGV`` on CPU (gloo; one torch thread
    per process, offline) in its own process group, so a timeout ends the workers too; returns the
    combined log and raises ``RuntimeError`` with its tail on a timeout or a non-zero exit."""
    accelerate = Path(sys.executable).with_name("accelerate")
    multi = ["--multi_gpu"] if num_processes > 1 else []
    cmd = [str(accelerate), "launch", *multi, "--num_processes", str(num_processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *argv]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(cwd))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("accelerate launch timed out: " + proc.communicate()[0][-4000:]) from None
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited {proc.returncode}: " + log[-4000:])
    return log


def load_script(path: str | Path):
    """The Python file ``path`` (a ``scripts/*`` entry point, not a package module) imported as a module."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
