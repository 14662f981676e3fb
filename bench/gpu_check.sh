#!/usr/bin/env bash
# The GPU-only paths the CPU test suite cannot reach, as short real runs on one CUDA GPU:
#   1. pure-bf16 Adafactor (stochastic rounding) with flex_attention, then a resume; the same with --compile and sdpa
#   2. bf16 autocast AdamW with SDPA on a larger config, and Muon when this version has it
#   3. FSDP2 through Accelerate's FSDP config (1 process, nccl) with activation checkpointing, then a resume
#   4. the CUDA-only tests (varlen kernel, pinned batches, compiled Adafactor) and a compiled varlen run
# Each step prints its last log lines; the script stops at the first failure.
#     bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
COMMON=(--dataset builtin --vocab-size 2048 --tokenizer-docs 2000 --warmup-steps 5 --step-cadence 0.02
        --eval-batches 2 --sample-tokens 16 --seed 1)

step() { local name=$1; shift; echo "== $name: $*"; SECONDS=0
         "$@" > "$out/$name.log" 2>&1 || { tail -40 "$out/$name.log"; echo "== $name FAILED"; exit 1; }
         grep -E "^step|final eval|resumed|layout|compile|error" "$out/$name.log" | tail -6; echo "== $name ok in ${SECONDS}s"; }

step flex-bf16 $PY train.py --model tiny "${COMMON[@]}" --max-length 512 --batch-size 16 --max-steps 20 \
    --attn-implementation flex_attention --dtype bf16 --optimizer adafactor --output-dir /tmp/g1 --init-model
step flex-resume $PY train.py --model tiny "${COMMON[@]}" --max-length 512 --batch-size 16 --max-steps 30 \
    --attn-implementation flex_attention --dtype bf16 --optimizer adafactor --output-dir /tmp/g1
step compile-sdpa $PY train.py --model tiny "${COMMON[@]}" --max-length 512 --batch-size 16 --max-steps 20 \
    --compile --dtype bf16 --optimizer adafactor --output-dir /tmp/g5 --init-model
step adamw-autocast $PY train.py --model llama-30m "${COMMON[@]}" --max-length 1024 --batch-size 8 --max-steps 20 \
    --dtype bf16 --optimizer adamw --output-dir /tmp/g2 --init-model
if $PY train.py --help | grep -q muon; then
  step muon $PY train.py --model llama-30m "${COMMON[@]}" --max-length 1024 --batch-size 8 --max-steps 20 \
      --dtype bf16 --optimizer muon --output-dir /tmp/g3 --init-model
fi
step fsdp-ac $PY -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 \
    train.py --model tiny "${COMMON[@]}" --max-length 512 --batch-size 8 --max-steps 10 --dtype bf16 \
    --optimizer adafactor --activation-checkpointing --output-dir /tmp/g4 --init-model
step fsdp-resume $PY -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 \
    train.py --model tiny "${COMMON[@]}" --max-length 512 --batch-size 8 --max-steps 14 --dtype bf16 \
    --optimizer adafactor --activation-checkpointing --output-dir /tmp/g4
step cuda-tests $PY -m pytest -q -p no:cacheprovider tests/test_models_attention.py tests/test_data_prefetch.py \
    tests/test_optim.py -k "cuda or pinned or compiled"
step varlen-compile $PY train.py --model tiny "${COMMON[@]}" --max-length 512 --batch-size 16 --max-steps 20 \
    --compile --attn-implementation varlen --dtype bf16 --optimizer adafactor --output-dir /tmp/g6 --init-model
echo "all GPU checks passed"
