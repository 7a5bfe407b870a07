#!/usr/bin/env bash
# Stage throughput of the DDPM-CIFAR10 architecture (35.7 M parameters, 32 px, 1000 timesteps;
# random weights) on one NVIDIA GPU, at the paper's batches: BBTI and sampling 100, TERD 16 and
# PureDiffusion 40 (their own), importance 16, fine-tuning 128, the FID pass 128 (the
# evaluation's). Prints benchmarks/stages.py's table (evaluations/s, ratios to the plain forward
# and forward+backward, targets, peak GPU memory per stage) and the seconds each stage would take
# at the paper's budgets beside the paper's Table 7 (one V100): BBTI 8.41 / 5.15 / 2.17 min,
# removal 60.74 / 58.85 / 53.64 s, fine-tuning 40.43 / 42.74 / 38.48 min (BadDiff / VillanDiff /
# TrojDiff). Chains are strided 50-step DDPM chains and budgets short; the importance runs the
# paper's own work (2 passes x 50 timesteps x batch 16). Under 10 minutes on one GPU (a hard
# limit of 590 s stops it otherwise).
#
#     benchmarks/gpu.sh                 # from the repository root, with .venv (or PYTHON=...)
#     benchmarks/gpu.sh --reps 5        # extra options go to benchmarks/stages.py
#     benchmarks/gpu.sh --precision bf16   # the same under bf16 autocast (or tf32)
#
# Whether TF32 and bf16 keep the verdicts and ASRs there (needs a finished default run in results/):
#     .venv/bin/python benchmarks/precision.py --device cuda --precisions fp32 tf32 bf16 \
#         --encoder classifier:results/classifiers/digits_16
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "benchmarks/gpu.sh: no NVIDIA GPU on this machine (nvidia-smi finds none); run it on a" \
         "GPU node. On CPU: $PYTHON benchmarks/stages.py --arch both" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "benchmarks/gpu.sh: nvidia-smi sees a GPU but torch does not (a CPU-only torch build," \
         "or CUDA_VISIBLE_DEVICES hides it)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

timeout 590 "$PYTHON" benchmarks/stages.py --arch cifar --device cuda --threads 4 --steps 50 \
    --batch 100 terd=16 purediffusion=40 importance=16 finetune=128 fid=128 \
    --iters 2 --finetune-steps 50 --importance-steps 50 --reps 3 --paper --markdown "$@"
