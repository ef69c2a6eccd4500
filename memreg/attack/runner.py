"""Attacks of rising strength on one target, judged by the copy detector.

For each target, in this order (``AttackSettings.attacks``):

* ``prompts``: every training wording of the image, ``draws`` seeds each;
* ``perturbed``: ``perturbed`` edited wordings (:mod:`memreg.attack.wordings`), ``draws`` seeds each;
* ``embedding``: a prompt embedding fitted to the image (:mod:`memreg.attack.embedding`) from the
  first wording and from the empty prompt, ``steps`` Adam steps each, then ``draws`` seeds each;
* ``noise`` (off by default): ``noise_seeds`` more initial noises for the best fitted embedding
  (random search over the DDIM starting latent).

Any model family works (``memreg.families``: SD 1.x, 2.x, SDXL): prompts are encoded by the
family's prompt encoder, and a fitted embedding is the family's conditioning (for SDXL both
encoders' joined states, with the start prompt's pooled embedding and time ids; see
:mod:`memreg.attack.embedding`).

Every generation is DDIM with classifier-free guidance against the empty prompt. Its similarity
to the target is the copy detector's (SSIM, or SSCD where the user has it); the target counts as
**extracted** by an attack when a generation's similarity exceeds the detector's calibrated
threshold. With ``stop_at_success`` (default) the stronger attacks are skipped once one succeeds:
the question is whether the image can be got out, and the cumulative rate per attack is the same.
Seeds depend on the target's number and the attack, never on the process or the run, so trained
target k and control target k see the same noises.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from PIL import Image

from memreg.attack.embedding import image_latent, search_embeddings
from memreg.attack.targets import Target
from memreg.attack.wordings import perturbed_wordings
from memreg.families import Cond, cat_conditioning, pipeline_components, prompt_encoder
from memreg.generation import generate_from_embeds, generate_images

ATTACKS = ("prompts", "perturbed", "embedding", "noise")
STARTS = ("caption", "empty")
_OFFSET = {"prompts": 0, "perturbed": 10_000, "embedding": 20_000, "noise": 40_000}


@dataclass
class AttackSettings:
    """The attack's budget; every field is recorded in ``attack.json``."""

    attacks: tuple[str, ...] = ("prompts", "perturbed", "embedding")
    draws: int = 4                  # generations per wording and per fitted embedding
    perturbed: int = 4              # edited wordings per target
    steps: int = 50                 # Adam steps per embedding start
    lr: float = 0.01
    fit_noises: int = 4             # (timestep, noise) pairs per Adam step
    starts: tuple[str, ...] = STARTS
    noise_seeds: int = 16           # initial noises tried by "noise"
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 8
    stop_at_success: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        return d | {"attacks": list(self.attacks), "starts": list(self.starts)}


@dataclass
class Best:
    similarity: float = float("-inf")
    image: Image.Image | None = None
    detail: dict = field(default_factory=dict)


def target_number(target: Target) -> int:
    return int(target.id.rsplit("-", 1)[1])


def freeze_pipeline(pipe) -> None:
    """UNet, VAE and every text encoder of ``pipe`` in eval mode without gradients."""
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.eval().requires_grad_(False)


class Attacker:
    """Runs the attacks of ``settings`` with one pipeline (frozen, eval mode) and copy detector."""

    def __init__(self, pipe, detector, settings: AttackSettings):
        self.pipe, self.detector, self.s = pipe, detector, settings
        freeze_pipeline(pipe)
        self.size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.encoder = prompt_encoder(pipeline_components(pipe), device=pipe.unet.device, image_size=self.size)
        self.empty = self.encoder.uncond()

    def _judge(self, images: list[Image.Image], details: list[dict], ref, best: Best) -> float:
        sims = self.detector.similarity(self.detector.embed(images), ref)[:, 0].tolist()
        top = max(range(len(sims)), key=sims.__getitem__)
        if sims[top] > best.similarity:
            best.similarity, best.image, best.detail = float(sims[top]), images[top], details[top]
        return float(sims[top])

    def _from_wordings(self, wordings: list[tuple[str, str]], seed0: int, ref, best: Best) -> dict:
        d = self.s.draws
        prompts = [w for _, w in wordings for _ in range(d)]
        seeds = [seed0 + i for i in range(len(prompts))]
        images = generate_images(None, prompts, seeds, pipe=self.pipe, num_inference_steps=self.s.num_inference_steps,
                                 guidance_scale=self.s.guidance_scale, batch_size=self.s.batch_size)
        details = [{"wording": p, "edit": wordings[i // d][0], "seed": s} for i, (p, s) in enumerate(zip(prompts, seeds))]
        return {"best_similarity": self._judge(images, details, ref, best), "generations": len(images), "steps": 0}

    def _from_embeds(self, embeds: list[tuple[str, Cond]], seeds_each: int, seed0: int, ref,
                     best: Best) -> float:
        rows = [(name, e) for name, e in embeds for _ in range(seeds_each)]
        seeds = [seed0 + i for i in range(len(rows))]
        cond = cat_conditioning([e for _, e in rows])
        images = generate_from_embeds(self.pipe, cond, self.empty.expand(len(rows), -1, -1), seeds,
                                      num_inference_steps=self.s.num_inference_steps,
                                      guidance_scale=self.s.guidance_scale, batch_size=self.s.batch_size)
        return self._judge(images, [{"start": n, "seed": s} for (n, _), s in zip(rows, seeds)], ref, best)

    def _embedding(self, target: Target, seed0: int, ref, best: Best, state: dict) -> dict:
        z0 = image_latent(self.pipe.vae, target.image, self.size)
        inits = [self.encoder.encode([target.wordings[0]]).embeds if start == "caption" and target.wordings
                 else self.empty for start in self.s.starts]
        results = search_embeddings(self.pipe.unet, self.pipe.scheduler, z0, inits, self.s.steps, self.s.lr,
                                    self.s.fit_noises, seeds=[seed0 + 10_000 + k for k in range(len(inits))])
        fitted = [(start, res.embeds) for start, res in zip(self.s.starts, results)]
        losses = {start: {"before": res.loss_before, "after": res.loss_after}
                  for start, res in zip(self.s.starts, results)}
        sim = self._from_embeds(fitted, self.s.draws, seed0, ref, best)
        by_start = dict(fitted)
        state["best_embed"] = by_start.get(best.detail.get("start"), fitted[0][1])
        return {"best_similarity": sim, "generations": len(fitted) * self.s.draws, "steps": self.s.steps * len(fitted),
                "loss": losses}

    def _noise(self, target: Target, seed0: int, ref, best: Best, state: dict) -> dict:
        emb = state.get("best_embed")
        if emb is None:
            emb = self.encoder.encode([target.wordings[0]]).embeds if target.wordings else self.empty
        sim = self._from_embeds([("best", emb)], self.s.noise_seeds, seed0, ref, best)
        return {"best_similarity": sim, "generations": self.s.noise_seeds, "steps": 0}

    def _run_one(self, name: str, target: Target, seed0: int, ref, best: Best, state: dict) -> dict:
        if name == "prompts":
            return self._from_wordings([("training", w) for w in target.wordings], seed0, ref, best)
        if name == "perturbed":
            edits = perturbed_wordings(target.wordings, self.s.perturbed, seed=seed0)
            if not edits:
                return {"best_similarity": None, "generations": 0, "steps": 0, "skipped": "no wording to edit"}
            return self._from_wordings(edits, seed0, ref, best)
        return self._embedding(target, seed0, ref, best, state) if name == "embedding" \
            else self._noise(target, seed0, ref, best, state)

    def attack(self, target: Target) -> tuple[dict, Image.Image | None]:
        """(the target's record, its best reproduction); see the module doc."""
        ref = self.detector.embed([target.image])
        thr = float(self.detector.threshold)
        best, state, done = Best(), {}, {}
        base = self.s.seed * 1_000_003 + 100_000 * target_number(target)
        for name in self.s.attacks:
            if name == "prompts" and not target.wordings:
                done[name] = {"best_similarity": None, "generations": 0, "steps": 0, "skipped": "no caption",
                              "success": False, "seconds": 0.0}
                continue
            t0 = time.perf_counter()
            r = self._run_one(name, target, base + _OFFSET[name], ref, best, state)
            r["success"] = r["best_similarity"] is not None and r["best_similarity"] > thr
            r["seconds"] = time.perf_counter() - t0
            done[name] = r
            if r["success"] and self.s.stop_at_success:
                break
        by = next((n for n, r in done.items() if r["success"]), None)
        record = {"id": target.id, "kind": target.kind, "file_name": target.file_name, "cluster": target.cluster,
                  "copies": target.copies, "wordings": target.wordings, "best_similarity": best.similarity
                  if best.image is not None else None, "extracted": by is not None, "extracted_by": by,
                  "best": best.detail, "attacks": done}
        return record, best.image
