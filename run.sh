#!/usr/bin/env bash
# Named presets: one command each. Usage:
#   ./run.sh [-d DEVICES] PRESET [more train.py options...]
#   -d 0,1,3   use these GPUs (sets CUDA_VISIBLE_DEVICES and one process per GPU); default: all GPUs
# Extra options are appended to the preset's, so `./run.sh default --max-steps 100` works.
# Every preset is a plain command you can copy; set PYTHON to use another interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-.venv/bin/python}
DEVICES=""
while getopts "d:" opt; do
  case $opt in
    d) DEVICES=$OPTARG ;;
    *) echo "usage: ./run.sh [-d 0,1,3] PRESET [train.py options...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
PRESET=${1:-}
[ $# -gt 0 ] && shift

if [ -n "$DEVICES" ]; then
  export CUDA_VISIBLE_DEVICES=$DEVICES
fi
# Number of GPUs this run uses (0 on a CPU-only machine).
gpus() {
  if [ -n "$DEVICES" ]; then echo "$DEVICES" | tr ',' '\n' | grep -c .
  else "$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0; fi
}

# DDP launch: plain python on 0-1 GPU, accelerate with one process per GPU otherwise.
train() {
  local n; n=$(gpus)
  if [ "$n" -le 1 ]; then
    "$PYTHON" train.py "$@"
  else
    "$PYTHON" -m accelerate.commands.launch --config_file accelerate_configs/4gpu.yaml --num_processes "$n" train.py "$@"
  fi
}

# Pipeline launch: one process per GPU through the deepspeed launcher (each process one or two stages).
train_pipeline() {
  local include=""
  [ -n "$DEVICES" ] && include="--include localhost:$DEVICES" && unset CUDA_VISIBLE_DEVICES
  # shellcheck disable=SC2086
  "$(dirname "$PYTHON")/deepspeed" $include train.py --pipeline "$@"
}

case $PRESET in
  demo)
    # Offline CPU demo: tiny Llama (1.3M params) on the built-in corpus (Python's own documentation), 3M tokens,
    # AdamW, one cosine from the peak LR over the whole run. About 3 minutes on 2 CPU cores; the eval loss falls
    # from 7.6 to ~4.3 (56%), then a sample and the Hugging Face export folder are printed.
    "$PYTHON" train.py \
      --init-model \
      --overwrite-output-dir \
      --output-dir output_models/demo \
      --model tiny \
      --dataset builtin \
      --vocab-size 2048 \
      --tokenizer-docs 20000 \
      --max-length 128 \
      --batch-size 16 \
      --total-tokens 0.003 \
      --min-cooldown-tokens 0.003 \
      --learning-rate 1e-3 \
      --warmup-steps 50 \
      --optimizer adamw \
      --step-cadence 8 \
      --eval-batches 4 \
      "$@"
    ;;
  default)
    # Example 1: DeepOne 162M, 3B tokens (Chinchilla-optimal), flex attention. ~6-8 h on 4x RTX 3090.
    train \
      --init-model \
      --attn-implementation flex_attention \
      "$@"
    ;;
  long)
    # Example 2: 10B tokens, gentle LR decay. ~1 day on 4x RTX 3090.
    train \
      --init-model \
      --output-dir output_models/long \
      --total-tokens 10 \
      --attn-implementation flex_attention \
      "$@"
    ;;
  small)
    # Example 3: Llama 30M, batch 16, checkpoints 4x less often. ~1 h on one RTX 3090.
    train \
      --init-model \
      --output-dir output_models/small \
      --model llama-30m \
      --batch-size 16 \
      --step-cadence 4.0 \
      --attn-implementation flex_attention \
      "$@"
    ;;
  explore)
    # Example 5: quick LR probe, 2000 steps, no checkpoints. ~20 min on 4x RTX 3090.
    train \
      --init-model \
      --output-dir output_models/explore \
      --max-steps 2000 \
      --save-strategy no \
      --learning-rate 2.0e-5 \
      --attn-implementation flex_attention \
      "$@"
    ;;
  resume)
    # Example 6: continue the newest checkpoint to a 10B budget (dataset position restored).
    train \
      --total-tokens 10 \
      --attn-implementation flex_attention \
      "$@"
    ;;
  pipeline)
    # Example 7: pipeline parallel with the interleaved schedule, 2 stages per GPU (8 stages on 4 GPUs), batch 4 per
    # GPU as 8 micro-batches of 2 per step, on torch.distributed.pipelining. Use with -d 0,1,2,3; ~6-8 h on 4 GPUs.
    train_pipeline \
      --init-model \
      --output-dir output_models/pipeline \
      --attn-implementation flex_attention \
      --pipeline-schedule ScheduleInterleaved1F1B \
      "$@"
    ;;
  pipeline_test)
    # Example 7, performance probe: GPipe, 2 microbatches per stage, 100 steps, no checkpoints. Use with -d 0,1.
    train_pipeline \
      --init-model \
      --output-dir output_models/pipeline_test \
      --attn-implementation sdpa \
      --microbatch-scale 2 \
      --batch-size 8 \
      --max-steps 100 \
      --save-strategy no \
      --pipeline-schedule GPipe \
      "$@"
    ;;
  conservative)
    # Example 8: 50B tokens with a 200B-token minimum cooldown (LR stays high until late). Several days on 4 GPUs.
    train \
      --init-model \
      --output-dir output_models/conservative \
      --total-tokens 50 \
      --min-cooldown-tokens 200 \
      --attn-implementation flex_attention \
      "$@"
    ;;
  big_adam)
    # Spec config big_adam: AdamW (fp32 master weights, bf16 autocast on GPU) with a large batch through gradient
    # accumulation: global batch 4 x 8 x world size (128 sequences on 4 GPUs, LR scaled by sqrt(128)). 4 GPUs, ~8 h.
    train \
      --init-model \
      --optimizer adamw \
      --gradient-accumulation-steps 8 \
      --output-dir output_models/big_adam \
      --attn-implementation flex_attention \
      "$@"
    ;;
  curriculum)
    # Spec config tiny_small_lm: TinyStories for the first 300M tokens, blending into the SmolLM mix over the last
    # 100M of them (a soft sequential switch, logged as a "stage" event), then the SmolLM mix. 4 GPUs, ~6-8 h.
    train \
      --init-model \
      --dataset "roneneldan/TinyStories@300M~100M;smollm" \
      --output-dir output_models/curriculum \
      --attn-implementation flex_attention \
      "$@"
    ;;
  *)
    echo "unknown preset '${PRESET}'; presets: demo default long small explore resume pipeline pipeline_test conservative big_adam curriculum" >&2
    echo "usage: ./run.sh [-d 0,1,3] PRESET [train.py options...]  (Example 4: ./run.sh -d 0,1,3,4,5 default)" >&2
    exit 2
    ;;
esac
