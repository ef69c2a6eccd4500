"""memreg attack on a planted memorization: the over-trained photo is extracted, never-seen photos
are not; the white-box search finds the photo without its caption; budgets and resume."""

import json

import torch

from memreg.attack import AttackSettings, Target, attack_targets, load_pipeline
from memreg.cli import main
from memreg.copy_detect import build_copy_detector

from .conftest import CONTROL, MEMORIZED, photo

FAST = ["--draws", "2", "--steps", "20", "--num-inference-steps", "10", "--perturbed", "2", "--no-progress"]


def _attack(planted, out, *extra, max_targets="2"):
    return main(["attack", "--model", str(planted["model"]), "--data", str(planted["data"]), "--control",
                 str(planted["control"]), "--out", str(out), "--max-targets", max_targets, "--shard-size", "1", *FAST,
                 *extra])


def test_planted_photo_is_extracted_and_control_is_not(planted, tmp_path, capsys):
    assert _attack(planted, tmp_path / "a") == 0
    report = json.loads((tmp_path / "a" / "attack.json").read_text())
    by_id = {r["id"]: r for r in report["targets"]}
    mem = by_id["trained-00000"]
    assert mem["copies"] == 3 and mem["wordings"] == [MEMORIZED[1]]
    assert mem["extracted"] and mem["extracted_by"] == "prompts" and mem["best_similarity"] > 0.5
    assert report["counts"] == {"trained": 2, "control": 2} and report["complete"]
    for r in report["targets"]:
        if r["kind"] == "control":
            assert not r["extracted"] and set(r["attacks"]) == {"prompts", "perturbed", "embedding"}, r
            assert r["attacks"]["embedding"]["steps"] == 2 * 20          # two starts x --steps
            assert r["attacks"]["prompts"]["generations"] == 2           # one wording x --draws
    assert report["rates"]["control"]["embedding"]["k"] == 0
    assert report["rates"]["trained"]["prompts"]["k"] >= 1
    assert (tmp_path / "a" / "images" / "trained-00000-best.png").is_file()
    out = capsys.readouterr().out
    assert "control = false positives" in out and "+embedding" in out


def test_embedding_search_finds_the_photo_without_its_caption(planted):
    pipe = load_pipeline(str(planted["model"]))
    before = [p.clone() for p in pipe.unet.parameters()]
    det = build_copy_detector("ssim")
    s = AttackSettings(attacks=("embedding",), starts=("empty",), steps=60, lr=0.05, draws=4, num_inference_steps=10)
    targets = [Target("trained-00000", "trained", photo(MEMORIZED[0]), [], 3, "mem_0.png"),
               Target("control-00000", "control", photo(CONTROL[0][0]), [], 1, "x.png")]
    records, images = attack_targets(pipe, det, targets, s)
    assert records[0]["extracted"] and records[0]["extracted_by"] == "embedding", records[0]
    assert not records[1]["extracted"], records[1]
    loss = records[0]["attacks"]["embedding"]["loss"]["empty"]
    assert loss["after"] < loss["before"]                        # the search lowers the loss at fixed (t, noise)
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.unet.parameters()))
    assert not any(p.requires_grad for p in pipe.unet.parameters()) and not pipe.unet.training


def test_time_budget_then_resume(planted, tmp_path, capsys):
    out = tmp_path / "b"
    run = lambda *extra: _attack(planted, out, "--attacks", "prompts", *extra)  # noqa: E731 (the cheap attack)
    assert run("--time-budget", "0.001") == 0
    report = json.loads((out / "attack.json").read_text())
    assert not report["complete"] and report["targets"] == []
    assert "run the same command again to continue" in capsys.readouterr().out
    assert run() == 0                                            # an incomplete run is continued, not refused
    parts = sorted((out / "parts").glob("shard-*.jsonl"))
    assert len(parts) == 4 and json.loads((out / "attack.json").read_text())["complete"]
    # a finished run is refused without --overwrite; a lost shard is redone alone
    assert run() == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    for f in ("attack.json", "attack.html"):
        (out / f).unlink()
    assert run() == 0
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in parts if p != parts[1]) and parts[1].is_file()
    assert len(json.loads((out / "attack.json").read_text())["targets"]) == 4


def test_batched_starts_follow_the_trajectories_searched_alone(planted):
    """Two starts searched in one batched call end where each ends searched alone (same seeds)."""
    from memreg.attack.embedding import image_latent, search_embeddings
    from memreg.encoding import PromptEncoder

    pipe = load_pipeline(str(planted["model"]))
    enc = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    z0 = image_latent(pipe.vae, photo(MEMORIZED[0]), pipe.unet.config.sample_size * pipe.vae_scale_factor)
    inits = [enc.encode([MEMORIZED[1]]).embeds, enc.uncond()]
    both = search_embeddings(pipe.unet, pipe.scheduler, z0, inits, steps=5, lr=0.05, fit_noises=3, seeds=[7, 9])
    alone = [search_embeddings(pipe.unet, pipe.scheduler, z0, [e], steps=5, lr=0.05, fit_noises=3, seeds=[s])[0]
             for e, s in zip(inits, (7, 9))]
    for b, a, init in zip(both, alone, inits):
        assert b.embeds.shape == init.shape
        assert torch.allclose(b.embeds, a.embeds, atol=1e-5)
        assert abs(b.loss_before - a.loss_before) < 1e-5 and abs(b.loss_after - a.loss_after) < 1e-5
        assert not torch.equal(b.embeds, init)                     # the search moved it
