#!/usr/bin/env bash
# GPU check for sessions lent a CUDA machine: every method's debug preset for a few steps on CUDA in
# bf16-mixed, printing images/s (benchmarks/gpu_throughput.py), then a 2-step bf16 DDP smoke test if
# more than one GPU is visible. Offline: tiny teachers are generated locally.
#   bash benchmarks/gpu_check.sh [steps] [out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-20}"
OUT="${2:-${OUT:-.}/gpu_check.json}"
export HF_HUB_OFFLINE=1
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("device:", torch.cuda.get_device_name(0), "| bf16 supported:", torch.cuda.is_bf16_supported(),
      "| GPUs:", torch.cuda.device_count())
PY
python benchmarks/gpu_throughput.py --accelerator gpu --precision bf16-mixed --steps "$STEPS" --out "$OUT"
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then
  lightning-distill fit --config configs/teacher/debug.yaml --trainer.accelerator gpu --trainer.devices 2 \
    --trainer.strategy ddp --trainer.precision bf16-mixed --trainer.default_root_dir "$(mktemp -d)/ddp"
fi
