#!/usr/bin/env python
"""Fine-tune Stable Diffusion (LoRA or full) with an optional memorization guard.

    python train/train.py --config configs/tiny_cpu.yaml --max_train_steps 6 --output_dir out/tiny
    accelerate launch train/train.py --config configs/sd15_lora_guard.yaml --output_dir out/sd15
    accelerate launch --multi_gpu --num_processes 2 train/train.py --config configs/tiny_cpu.yaml ...

Multi-process on CPU: accelerate 1.15's ``launch --cpu --num_processes N`` starts ONE process unless
given an MPI hostfile (``--mpirun_hostfile``); ``launch --multi_gpu --num_processes N`` (torchrun) on a
machine without GPUs runs N processes and the trainer switches to DDP on CPU (gloo) by itself.

Flags are diffusers' text-to-image flag names; nested keys use dots (``--guard.type penalty``,
``--guard.weight 0.5``, ``--eval.enabled true``). Caption augmentation and repeats take kohya-ss'
names (``--shuffle_caption --keep_tokens 1 --caption_tag_dropout_rate 0.1 --num_repeats 10``;
``memreg.training.captions``). Everything lives in ``memreg.training``.

The model family (SD 1.x, 2.x or SDXL, ``memreg.families``) is read from the checkpoint. SDXL takes
diffusers' SDXL script flags: ``--pretrained_vae_model_name_or_path`` (e.g. the fp16-fix VAE), the
size and crop conditioning from ``--resolution``/``--center_crop``/``--random_flip`` as those
scripts compute it, and ``--train_text_encoder`` (LoRA or full) trains both text encoders.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memreg.errors import MemregError  # noqa: E402
from memreg.training.config import load_config  # noqa: E402


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        from memreg.training.config import valid_keys

        print("keys:\n  " + "\n  ".join(valid_keys()))
        return None
    try:
        cfg = load_config(argv)
        from memreg.training.loop import train

        return train(cfg)
    except MemregError as e:  # bad input, a full disk, a non-finite step: one line, exit 2
        if __name__ == "__main__":
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
