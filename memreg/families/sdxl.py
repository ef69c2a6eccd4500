"""SDXL: two CLIP text encoders and a UNet with ``text_time`` added conditioning.

As diffusers' ``StableDiffusionXLPipeline`` and its SDXL training scripts build it:

* the cross-attention states are the penultimate hidden states of both encoders, concatenated on
  the feature axis (768 + 1280 = 2048 for SDXL base); the pooled ``text_embeds`` is the second
  encoder's projected output (``CLIPTextModelWithProjection``);
* ``time_ids`` = original size (h, w) + crop top-left (top, left) + target size (h, w): at
  inference (h, w, 0, 0, h, w) for the generated size; in training the image's size before
  resizing, the crop's corner in the resized image (``left`` replaced by ``resolution - left``
  when the image is flipped, as the diffusers scripts compute it) and (resolution, resolution);
* the empty prompt: with the pipeline's ``force_zeros_for_empty_prompt`` (SDXL base: true) the
  unconditional embeddings and pooled embedding are zeros, otherwise the encoded ``""``; the
  score's ``u`` is what classifier-free guidance uses at inference.

Score weights: the paper publishes none for SDXL. SDXL predicts epsilon like SD 1.x (SD 2.x's
g2 = 0.1 came with v-prediction and the paper's score-space code for it), so the default is SD 1.x's
(g1 1, g2 2); it is not validated on real SDXL weights, and reports say so. The guard's default
signal is the norm term alone (``guard.term: auto`` with a reference), which g2 does not touch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from memreg.encoding import EncodedPrompts
from memreg.families.base import Components, ModelFamily, load_parts
from memreg.families.conditioning import Conditioning
from memreg.families.sdxl_kohya import sgm_kohya_key

SDXL_CLASS_NAMES = ("StableDiffusionXLPipeline",)
TEXT_TIME = "text_time"


def time_ids(original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int]) -> list[int]:
    """SDXL's micro-conditioning: ``original_size + crop_top_left + target_size`` (each (h, w) / (top, left))."""
    return [int(v) for v in (*original_size, *crop_top_left, *target_size)]


def flipped_crop_left(left: int, resolution: int) -> int:
    """The crop's ``left`` time id of a horizontally flipped training image, as diffusers' SDXL
    scripts compute it after cropping (``image.width - x1`` on the cropped image)."""
    return int(resolution) - int(left)


class SDXLPromptEncoder:
    """Prompts -> :class:`Conditioning` (embeds (B, 77, D1 + D2), ``text_embeds`` (B, P), ``time_ids``
    (B, 6) for ``image_size`` pixels); same interface as :class:`memreg.encoding.PromptEncoder`.

    ``model`` arguments take the pair of text encoders to use instead (e.g. their trained copies)."""

    def __init__(self, tokenizers, text_encoders, device=None, image_size: int = 1024,
                 force_zeros_for_empty_prompt: bool = True):
        if len(tokenizers) != 2 or len(text_encoders) != 2:
            raise ValueError("SDXL needs two tokenizers and two text encoders")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.tokenizer = self.tokenizers[0]
        self.text_encoder = self.text_encoders[0]
        self.device = device if device is not None else self.text_encoders[0].device
        self.max_length = self.tokenizers[0].model_max_length
        self.image_size = int(image_size)
        self.force_zeros = bool(force_zeros_for_empty_prompt)
        self._uncond: Conditioning | None = None

    def ids(self, prompts: list[str]) -> list[Tensor]:
        return [tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in self.tokenizers]

    def tokenize(self, prompts: list[str]) -> tuple[list[Tensor], list[bool]]:
        truncated = [False] * len(prompts)
        for tok in self.tokenizers:
            full = tok(list(prompts), truncation=False).input_ids
            truncated = [t or len(f) > tok.model_max_length for t, f in zip(truncated, full)]
        return self.ids(prompts), truncated

    def time_ids(self, batch: int, dtype, device) -> Tensor:
        s = self.image_size
        return torch.tensor([time_ids((s, s), (0, 0), (s, s))], dtype=dtype, device=device).expand(batch, 6)

    def embed_ids(self, ids: list[Tensor], model=None) -> Conditioning:
        encoders = list(model) if model is not None else self.text_encoders
        hidden, pooled = [], None
        for te, i in zip(encoders, ids):
            out = te(i.to(self.device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:   # the projected encoder's text_embeds (diffusers takes the first 2-d output)
                pooled = out[0] if pooled is None else pooled
        embeds = torch.cat(hidden, dim=-1)
        return Conditioning(embeds, {"text_embeds": pooled,
                                     "time_ids": self.time_ids(embeds.shape[0], embeds.dtype, embeds.device)})

    def __call__(self, prompts: list[str], model=None) -> Conditioning:
        return self.embed_ids(self.ids(prompts), model)

    def encode(self, prompts: list[str], batch_size: int | None = None) -> EncodedPrompts:
        ids, truncated = self.tokenize(prompts)
        step = batch_size or max(len(prompts), 1)
        with torch.no_grad():
            parts = [self.embed_ids([i[lo:lo + step] for i in ids]) for lo in range(0, len(prompts), step)]
        embeds = parts[0] if len(parts) == 1 else Conditioning(
            torch.cat([p.embeds for p in parts]), {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})
        return EncodedPrompts(embeds, truncated)

    def uncond(self, fresh: bool = False) -> Conditioning:
        """(1 row) empty-prompt conditioning: zeros with ``force_zeros_for_empty_prompt`` (then
        independent of the text encoders), else ``""`` encoded (again if ``fresh``)."""
        if self._uncond is not None and not (fresh and not self.force_zeros):
            return self._uncond
        if self.force_zeros:
            te1, te2 = self.text_encoders
            width = te1.config.hidden_size + te2.config.hidden_size
            dtype, device = te2.dtype, self.device
            embeds = torch.zeros(1, self.max_length, width, dtype=dtype, device=device)
            pooled = torch.zeros(1, te2.config.projection_dim, dtype=dtype, device=device)
            self._uncond = Conditioning(embeds, {"text_embeds": pooled, "time_ids": self.time_ids(1, dtype, device)})
        else:
            self._uncond = self.encode([""]).embeds
        return self._uncond


class SDXLFamily(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    pipeline_class_names = SDXL_CLASS_NAMES
    subfolders = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    weight_subfolders = ("unet", "vae", "text_encoder", "text_encoder_2")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    preset_validated = False
    preset_note = ("SDXL default weights g1 1, g2 2 (SD 1.x's: both predict epsilon); not validated on real "
                   "SDXL weights")

    def matches(self, class_name, unet_config, scheduler_config) -> bool:
        return class_name in SDXL_CLASS_NAMES or (
            class_name is None and unet_config.get("addition_embed_type") == TEXT_TIME)

    def load(self, model: str, *, revision=None, variant=None, dtype=torch.float32, device="cpu",
             with_vae: bool = True, vae_model: str | None = None) -> Components:
        parts = load_parts(model, [("tokenizer", "text_encoder", CLIPTextModel),
                                   ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection)],
                           revision=revision, variant=variant, dtype=dtype, device=device, with_vae=with_vae,
                           vae_model=vae_model)
        try:
            index = dict(StableDiffusionXLPipeline.load_config(model, revision=revision))
        except OSError:
            index = {}
        return Components(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], parts["scheduler"],
                          model, tokenizer_2=parts["tokenizer_2"], text_encoder_2=parts["text_encoder_2"],
                          family=self, vae_scale_factor=parts["vae_scale_factor"], pipeline_config=index)

    @staticmethod
    def force_zeros(components: Components) -> bool:
        return bool((components.pipeline_config or {}).get("force_zeros_for_empty_prompt", True))

    def prompt_encoder(self, components: Components, device=None, image_size: int | None = None):
        return SDXLPromptEncoder(components.tokenizers, components.text_encoders, device=device,
                                 image_size=image_size or components.image_size(),
                                 force_zeros_for_empty_prompt=self.force_zeros(components))

    def build_pipeline(self, components: Components, unet=None, scheduler=None):
        if components.vae is None:
            raise ValueError("image generation needs the VAE; load the components with with_vae=True")
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2,
            unet=unet if unet is not None else components.unet,
            scheduler=scheduler if scheduler is not None else DDIMScheduler.from_config(components.scheduler.config),
            force_zeros_for_empty_prompt=self.force_zeros(components), add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_pipeline_prompts(self, pipe, prompts: Sequence[str], height: int | None = None,
                                width: int | None = None):
        cond, uncond, pooled, pooled_u = pipe.encode_prompt(list(prompts), device=pipe.device,
                                                            num_images_per_prompt=1, do_classifier_free_guidance=True)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        h, w = height or size, width or size
        ids = torch.tensor([time_ids((h, w), (0, 0), (h, w))], dtype=cond.dtype, device=cond.device)
        b = cond.shape[0]
        return (Conditioning(cond, {"text_embeds": pooled, "time_ids": ids.expand(b, 6)}),
                Conditioning(uncond, {"text_embeds": pooled_u, "time_ids": ids.expand(uncond.shape[0], 6)}))

    def pipeline_kwargs(self, cond, uncond) -> dict:
        return {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds,
                "pooled_prompt_embeds": cond.added["text_embeds"],
                "negative_pooled_prompt_embeds": uncond.added["text_embeds"]}

    def training_conditioning(self, cond, batch: dict, resolution: int):
        """``time_ids`` of each training image from the batch's ``original_size`` and
        ``crop_top_left`` (a batch without them keeps the encoder's centred defaults)."""
        if "original_size" not in batch:
            return cond
        orig, crop = batch["original_size"], batch["crop_top_left"]
        target = torch.tensor([[resolution, resolution]], dtype=orig.dtype).expand(orig.shape[0], 2)
        ids = torch.cat([orig.cpu(), crop.cpu(), target], dim=1).to(device=cond.device, dtype=cond.dtype)
        return Conditioning(cond.embeds, {**cond.added, "time_ids": ids})

    def pipeline_class(self):
        return StableDiffusionXLPipeline

    def pipeline_parts(self, components: Components) -> dict:
        return {"unet": components.unet, "text_encoder": components.text_encoder,
                "text_encoder_2": components.text_encoder_2, "vae": components.vae, "tokenizer": components.tokenizer,
                "tokenizer_2": components.tokenizer_2}

    def kohya_key(self, key: str, unet_config=None) -> str:
        """UNet keys by the SGM UNet's module names (``lora_unet_input_blocks_4_1_...``), as kohya's
        sd-scripts, A1111 and ComfyUI name SDXL LoRAs (:mod:`memreg.families.sdxl_kohya`); the text
        encoders' ``lora_te1_``/``lora_te2_`` as they are."""
        if unet_config is None:
            raise ValueError("SDXL kohya keys follow the UNet's layout: pass its config")
        return sgm_kohya_key(key, unet_config)
