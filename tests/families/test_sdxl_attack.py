"""``memreg attack`` on the tiny SDXL pipeline: the command runs end to end, and the embedding search
fits SDXL's joined text states with the start's pooled embedding and time ids carried along."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from memreg.cli import main

SMALL = ["--draws", "1", "--steps", "2", "--num-inference-steps", "2", "--perturbed", "1", "--fit-noises", "1",
         "--noise-seeds", "1", "--batch-size", "2", "--shard-size", "1", "--no-progress"]


def _control(root):
    """Two never-trained 32 px images with captions."""
    root.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i, cap in enumerate(["a white moon", "an orange boat"]):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / f"c{i}.png")
        rows.append(json.dumps({"file_name": f"c{i}.png", "text": cap}) + "\n")
    (root / "metadata.jsonl").write_text("".join(rows))
    return root


def test_attack_command_runs_on_sdxl(tiny_sdxl, sdxl_data, tmp_path):
    out = tmp_path / "attack"
    control = _control(tmp_path / "c")
    rc = main(["attack", "--model", str(tiny_sdxl), "--data", str(sdxl_data), "--control", str(control),
               "--out", str(out), "--max-targets", "1", "--max-control", "1", "--exhaustive",
               "--attacks", "prompts,perturbed,embedding,noise", *SMALL])
    assert rc == 0
    report = json.loads((out / "attack.json").read_text())
    assert report["complete"] and report["counts"] == {"trained": 1, "control": 1}
    assert (out / "attack.html").is_file()
    for r in report["targets"]:
        assert set(r["attacks"]) == {"prompts", "perturbed", "embedding", "noise"}, r
        assert all(math.isfinite(a["best_similarity"]) for a in r["attacks"].values()), r
        emb = r["attacks"]["embedding"]
        assert emb["steps"] == 2 * 2 and emb["generations"] == 2             # two starts x --steps / --draws
        assert all(math.isfinite(v) for start in emb["loss"].values() for v in start.values()), emb
        assert r["attacks"]["noise"]["generations"] == 1
        assert (out / "images" / f"{r['id']}-best.png").is_file()


def _hand_loss(unet, scheduler, z0, cond, seed: int, pairs: int = 16) -> float:
    """The denoising loss at ``pairs`` (t, noise) pairs drawn as the search draws them, by diffusers directly."""
    g = torch.Generator("cpu").manual_seed(seed)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), generator=g)
    noise = torch.randn((pairs, *z0.shape[1:]), generator=g)
    z = z0.expand(pairs, *z0.shape[1:])
    with torch.no_grad():
        pred = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond.embeds.expand(pairs, -1, -1),
                    added_cond_kwargs={k: v.expand(pairs, *v.shape[1:]) for k, v in cond.added.items()}).sample
    return F.mse_loss(pred, noise).item()     # SDXL predicts epsilon


def test_embedding_search_moves_the_joined_states_and_keeps_the_added_conditioning(tiny_sdxl):
    from memreg.attack import AttackSettings, Attacker, load_pipeline
    from memreg.attack.embedding import image_latent, search_embeddings
    from memreg.copy_detect import build_copy_detector
    from memreg.families import Conditioning

    pipe = load_pipeline(str(tiny_sdxl))
    assert pipe.scheduler.config.prediction_type == "epsilon"
    attacker = Attacker(pipe, build_copy_detector("ssim"), AttackSettings())
    # the empty start: force_zeros_for_empty_prompt (zeros), time ids of the 32 px samples
    empty = attacker.empty
    assert isinstance(empty, Conditioning) and empty.shape == (1, 77, 64)
    assert not empty.embeds.any() and not empty.added["text_embeds"].any()
    assert empty.added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    caption = attacker.encoder.encode(["a red circle"]).embeds
    assert caption.added["text_embeds"].abs().sum() > 0

    rng = np.random.default_rng(2)
    z0 = image_latent(pipe.vae, Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")), 32)
    inits = [caption, empty]
    res = search_embeddings(pipe.unet, pipe.scheduler, z0, inits, steps=3, lr=0.05, fit_noises=2, seeds=[5, 8])
    for r, init, seed in zip(res, inits, (5, 8)):
        assert isinstance(r.embeds, Conditioning) and r.embeds.shape == init.shape
        assert not torch.equal(r.embeds.embeds, init.embeds)                  # the joined states moved ...
        for k in ("text_embeds", "time_ids"):
            assert torch.equal(r.embeds.added[k], init.added[k])              # ... the added conditioning did not
        # before/after: the start's and the fitted conditioning's loss at the fixed pairs of seed + 1
        assert math.isclose(r.loss_before, _hand_loss(pipe.unet, pipe.scheduler, z0, init, seed + 1), rel_tol=1e-5)
        assert math.isclose(r.loss_after, _hand_loss(pipe.unet, pipe.scheduler, z0, r.embeds, seed + 1), rel_tol=1e-5)
        assert r.loss_after != r.loss_before
