#!/usr/bin/env bash
# GPU check at the published architectures (random weights, nothing fetched): < 5 min on one H200.
#
#   scripts/gpu_check.sh                 # on the GPU machine (device cuda)
#   scripts/gpu_check.sh --device cpu    # dry run on a CPU: 64 px, SDXL with one transformer block per attention
#
# 1. memreg.arch.gpu_check on SD 1.5 (512 px) and SDXL (1024 px), batch 2: fp16/bf16 autocast forward,
#    SDPA, the guard's probe (the norm term) under fp16/bf16, LoRA backward under autocast, 8-bit AdamW
#    if bitsandbytes is installed.
# 2. train/train.py on a random-weight SD 1.5 pipeline (scripts/make_real_arch.py), 2 LoRA steps with the
#    guard at its defaults, once per mixed precision (fp16 and bf16 on cuda; bf16 on cpu): the probe runs
#    inside the mixed-precision training loop and must log ("probe step").
# Prints one PASS/FAIL/SKIP line per check and exits 1 if any failed. Installs nothing; HF_HUB_OFFLINE=1.
set -u -o pipefail

cd "$(dirname "$0")/.."
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#--device=}"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 PYTHONPATH="$PWD"

if [ "$DEVICE" = cpu ]; then
  COMPONENT_ARGS=(--device cpu --latent 8 --blocks 1 --threads 2)
  LATENT=8
  PRECISIONS=(bf16)
  export CUDA_VISIBLE_DEVICES=""
else
  COMPONENT_ARGS=(--device "$DEVICE")
  LATENT=64
  PRECISIONS=(fp16 bf16)
fi
RES=$((8 * LATENT))
FAILED=0
WORK="$(mktemp -d -t memreg_gpu_check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

echo "== memreg gpu_check: device $DEVICE, python $PY, work dir $WORK"
"$PY" -m memreg.arch.gpu_check "${COMPONENT_ARGS[@]}" || FAILED=1

# training loop under mixed precision with the guard (SD 1.5 pipeline on disk, as a user's checkpoint)
if "$PY" scripts/make_real_arch.py sd15 "$WORK/sd15" --sample-size "$LATENT" > "$WORK/build.log" 2>&1; then
  echo "PASS build sd15 pipeline: $(tail -n 1 "$WORK/build.log")"
  python_img='
import json, sys
import numpy as np
from PIL import Image
root, res = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
with open(f"{root}/metadata.jsonl", "w") as f:
    for i, cap in enumerate(["a red circle", "a blue square", "a green triangle", "a yellow star"]):
        Image.fromarray((rng.random((res, res, 3)) * 255).astype("uint8")).save(f"{root}/{i}.png")
        f.write(json.dumps({"file_name": f"{i}.png", "text": cap}) + "\n")
'
  mkdir -p "$WORK/data" && "$PY" -c "$python_img" "$WORK/data" "$RES"
  for MP in "${PRECISIONS[@]}"; do
    LOG="$WORK/train_$MP.log"
    if "$PY" train/train.py --config configs/tiny_cpu.yaml --pretrained_model_name_or_path "$WORK/sd15" \
        --train_data_dir "$WORK/data" --output_dir "$WORK/run_$MP" --resolution "$RES" --train_batch_size 2 \
        --max_train_steps 2 --mixed_precision "$MP" --gradient_checkpointing true --report_to none \
        --guard.type anisotropy_gate > "$LOG" 2>&1 && grep -q "probe step" "$LOG"; then
      echo "PASS sd15 train/train.py LoRA with the guard, mixed_precision $MP: $(grep -m1 'probe step' "$LOG" | sed 's/.*probe step/probe step/')"
    else
      echo "FAIL sd15 train/train.py LoRA with the guard, mixed_precision $MP: $(tail -n 3 "$LOG" | tr '\n' ' ')"
      FAILED=1
    fi
  done
else
  echo "FAIL build sd15 pipeline: $(tail -n 3 "$WORK/build.log" | tr '\n' ' ')"
  FAILED=1
fi

echo "== $(( $(date +%s) - START )) s"
if [ "$FAILED" -ne 0 ]; then echo "FAIL gpu_check"; exit 1; fi
echo "PASS gpu_check"
