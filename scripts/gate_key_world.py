"""What the gate's key (``guard.gate_key``) changes when a memorized photo is reached by several wordings.

``--world wordings``: the demo world with one change: every copy of a memorized photo carries a
caption *list* of four wordings (the canonical caption, a word dropped, the shapes reordered, a
synonym: the demo's paraphrases), and the trainer draws one per step, as it does for any caption list.
``--world augment``: the demo's data with kohya's caption augmentation on in training (the two shapes
of a caption are its tags, ``caption_separator: " and "``, shuffled; 10% of captions dropped to "").
Three full fine-tunes from the demo's cached base (``make demo`` builds it): ``plain`` (no guard), the
guard at its defaults (``gate_key: image``) and the same guard keyed on the wording. Printed per run:
the exact-caption copy rate, the share of the duplicated / ordinary samples the gate took out, and
the held-out loss, from the demo's own evaluation.

    .venv/bin/python scripts/gate_key_world.py --data .cache/memreg-demo/data-<key> --base .cache/memreg-demo/base-<key>
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memreg import log_tags as tags  # noqa: E402
from memreg.demo.run import load_settings, run_all  # noqa: E402
from memreg.report import load_run  # noqa: E402

WORDINGS = ("drop", "reorder", "synonym")
RUNS = {"plain": {"guard.type": "none"},
        "gate_image": {"guard.type": "anisotropy_gate"},
        "gate_caption": {"guard.type": "anisotropy_gate", "guard.gate_key": "caption"}}
AUGMENT = {"shuffle_caption": True, "caption_separator": " and ", "caption_dropout_rate": 0.1}


def many_wordings_copy(data: Path, out: Path) -> Path:
    """A copy of the demo data whose duplicated rows carry ``captions``: the caption and its paraphrases."""
    if out.exists():
        raise SystemExit(f"{out} exists; give another --work dir (nothing is overwritten)")
    shutil.copytree(data, out)
    meta = out / "train" / "metadata.jsonl"
    manifest = json.loads((out / "manifest.json").read_text())
    para = {m["caption"]: m["paraphrases"] for m in manifest["memorized"]}
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    for r in rows:
        r["captions"] = [r["caption"]] + [para[r["caption"]][w] for w in WORDINGS] if r["group"] == "duplicated" \
            else [r["caption"]]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def gate_share(run_dir: Path, group: str) -> float:
    """The gate's share of ``group``'s samples over the run (the mean of its per-step logs)."""
    _, values = load_run(run_dir).series(tags.guard_gate_rate(group))
    return sum(values) / len(values) if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the demo's cached data dir (data-<key>)")
    p.add_argument("--base", required=True, help="the demo's cached base model (base-<key>)")
    p.add_argument("--work", default="out/gate_key_world", help="new dir for the data copy and the runs")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    p.add_argument("--world", choices=["wordings", "augment"], default="wordings")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    settings = load_settings(args.config)
    if args.world == "wordings":
        data = many_wordings_copy(Path(args.data), work / "data")
        settings["finetune"] = dict(settings["finetune"], caption_column="captions")
    else:
        data = Path(args.data)
        settings["finetune"] = dict(settings["finetune"], **AUGMENT)
    settings["runs"] = RUNS
    settings["attack"] = dict(settings["attack"], runs=[])
    rows = run_all({"studio": (settings, data, work)}, Path(args.base))[0]["studio"]
    print(f"{'run':13s} {'copy exact [95% CI]':>22s} {'gated dup':>10s} {'gated ord':>10s} {'held-out loss':>14s}")
    for name, r in rows.items():
        lo, hi = r["copy_exact"]["ci95"]
        print(f"{name:13s} {r['copy_exact']['rate']:>8.2f} [{lo:.2f},{hi:.2f}]     "
              f"{gate_share(work / 'runs' / name, 'duplicated'):>10.3f} {gate_share(work / 'runs' / name, 'ordinary'):>10.3f}"
              f" {r['heldout_loss']:>14.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
