"""The features on the tiny SDXL pipeline: ``memreg detect``, ``memreg generate --mitigate score``,
the training monitor and the audit's caption scorer."""

from __future__ import annotations

import contextlib
import io
import json

import torch

from memreg.cli import main

MEM = ["a red circle on a blue background", "a dog in the garden", "the old house"]
NONMEM = ["a green tree", "two cats on a table", "the sea at sunset", "a man with a book"]


def _run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def _files(tmp_path):
    (tmp_path / "mem.txt").write_text("\n".join(MEM) + "\n")
    (tmp_path / "nonmem.txt").write_text("\n".join(NONMEM) + "\n")
    return tmp_path / "mem.txt", tmp_path / "nonmem.txt"


def test_detect_scores_sdxl_and_says_the_weights_are_not_validated(tiny_sdxl, tmp_path):
    from memreg.detect import score_prompts
    from memreg.families import prompt_encoder
    from memreg.models import load_components
    from memreg.score import AnisotropyScore

    mem, nonmem = _files(tmp_path)
    rc, out = _run(["detect", "--model", str(tiny_sdxl), "--mem", str(mem), "--nonmem", str(nonmem),
                    "--out", str(tmp_path / "out"), "--seeds", "2", "--batch-size", "4", "--no-progress"])
    assert rc == 0 and "not validated on real SDXL weights" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model_family"]["name"] == "sdxl" and report["model_family"]["score_weights_validated"] is False
    rows = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(r["norm"] > 0 for r in rows)
    # the same numbers as the library's scoring loop with 4-sample batches over single prompts
    comps = load_components(str(tiny_sdxl), with_vae=False)
    scorer = AnisotropyScore(comps.unet, comps.scheduler, g1=1.0, g2=2.0)
    single = [score_prompts(scorer, prompt_encoder(comps), comps.scheduler, [p], seeds=[0, 1], batch_size=1,
                            wen_steps=0, share_uncond=False).norm[0] for p in MEM + NONMEM]
    assert all(abs(r["norm"] - s) <= 1e-4 * abs(s) for r, s in zip(rows, single))


def test_generate_mitigate_score_on_sdxl(tiny_sdxl, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(MEM) + "\n")
    (tmp_path / "ordinary.txt").write_text("\n".join(NONMEM) + "\n")
    out = tmp_path / "gen"
    rc, stdout = _run(["generate", "--model", str(tiny_sdxl), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                       "--calibrate", str(tmp_path / "ordinary.txt"), "--tau-quantile", "0.0",
                       "--target-quantile", "0.0", "--steps", "2", "--max-steps", "2", "--batch-size", "2",
                       "--no-progress"])
    assert rc == 0 and "3 images" in stdout
    rows = [json.loads(x) for x in (out / "mitigation.jsonl").read_text().splitlines()]
    assert any(r["flagged"] for r in rows)           # tau = the lowest ordinary score
    for r in rows:
        assert not r["flagged"] or r["steps"] >= 1


def test_mitigation_moves_only_the_token_embeddings(sdxl_components):
    from memreg.families import Conditioning, family_of
    from memreg.mitigate import MitigationConfig, mitigate_pipeline_prompts

    pipe = family_of(sdxl_components).build_pipeline(sdxl_components)
    res = mitigate_pipeline_prompts(pipe, MEM[:2], [0, 1], MitigationConfig(mode="score", tau=-1e9, max_steps=2))
    assert isinstance(res.prompt_embeds, Conditioning) and all(r.flagged for r in res.records)
    cond, _ = family_of(sdxl_components).encode_pipeline_prompts(pipe, MEM[:2])
    assert not torch.equal(res.prompt_embeds.embeds, cond.embeds)
    assert torch.equal(res.prompt_embeds.added["text_embeds"], cond.added["text_embeds"])
    assert torch.equal(res.prompt_embeds.embeds[:, 0], cond.embeds[:, 0])     # BOS kept


def test_monitor_detection_on_sdxl(sdxl_components):
    import numpy as np
    from PIL import Image

    from memreg.monitor import MemorizationMonitor
    from memreg.monitor_config import EvalConfig

    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    train = [{"image": ims[0], "caption": "a red circle", "id": 0}, {"image": ims[0].copy(), "caption": "a red circle",
                                                                      "id": 1},
             {"image": ims[1], "caption": "a photo of a dog", "id": 2}]
    heldout = [{"image": ims[2], "caption": "a yellow star at night", "id": 9}]
    mon = MemorizationMonitor(EvalConfig(enabled=True, seeds=1, batch_size=4, generate_every_n_steps=0,
                                         generate_at_end=True, max_generate_prompts=1, num_images_per_prompt=1,
                                         num_inference_steps=2),
                              components=sdxl_components, train_records=train, heldout_records=heldout)
    scalars = mon.maybe_run(0, final=True)
    assert scalars and any(k.startswith("eval/") for k in scalars)
    assert all(np.isfinite(v) for k, v in scalars.items() if "norm" in k)


def test_audit_caption_scorer_on_sdxl(tiny_sdxl):
    from memreg.audit.scoring import CaptionScorer, ScoreSettings

    scores = CaptionScorer(ScoreSettings(model=str(tiny_sdxl), seeds=(0,), batch_size=2, preset="sdxl"),
                           torch.device("cpu"))(["a red circle", "a dog"])
    assert set(scores) == {"a red circle", "a dog"} and all(v[0] > 0 for v in scores.values())
