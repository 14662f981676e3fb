#!/usr/bin/env bash
# The default job as users run it, timed on one CUDA GPU (H100 or H200: about 6 minutes):
#   deepone-162m, 4 x 4,096-token packed rows, document-masked flex_attention, pure-bf16 Adafactor with stochastic
#   rounding, through train.py; eager, --compile, and --compile with the varlen kernel. A 32K tokenizer is trained first (untimed) on the offline corpus.
#   Then our compiled model against transformers' compiled LlamaForCausalLM of the same shape (bench/model_throughput.py).
# Each run prints tokens/s and MFU (median of the logged intervals after step 10), peak memory, the first step's time
# (the compile) and recompile warnings; logs stay in OUT_DIR.
#     bash bench/gpu_default_job.sh [OUT_DIR]
set -uo pipefail
out=${1:-/tmp/gpu-default-job}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
JOB=(--model deepone-162m --dataset builtin --batch-size 4 --max-length 4096 --attn-implementation flex_attention
     --optimizer adafactor --max-steps 40 --warmup-steps 10 --step-cadence 0.2 --eval-batches 1 --sample-tokens 0
     --save-strategy no --init-model --overwrite-output-dir --seed 1)

SECONDS=0
timeout 300 $PY train.py "${JOB[@]}" --max-steps 1 --output-dir "$out/tokenizer-run" > "$out/tokenizer.log" 2>&1 \
  || { tail -20 "$out/tokenizer.log"; exit 1; }
echo "== tokenizer trained in ${SECONDS}s"

summary() {  # median tokens/s and MFU of the train records after step 10, the peak memory, the compile line
  $PY - "$1" "$2" <<'PY'
import json, pathlib, statistics, sys
run, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text()
records = [json.loads(line) for f in run.glob("runs/*/trainer_logs.jsonl") for line in f.read_text().splitlines()]
timed = [r for r in records if r.get("type") == "train" and r["step"] > 10]
if not timed:
    sys.exit("  no timed steps logged")
tps, mfu = statistics.median(r["tokens_per_s"] for r in timed), statistics.median(r["mfu"] for r in timed)
peak = max(r.get("peak_mem_bytes") or 0 for r in timed) / 2**30
print(f"  {tps:,.0f} tokens/s, MFU {mfu:.1%}, peak {peak:.1f} GiB over steps {timed[0]['step']}-{timed[-1]['step']}")
print("".join(f"  {line}\n" for line in log.splitlines() if "compile" in line or "recompiled" in line), end="")
PY
}
for mode in eager compiled varlen-compiled; do
  case $mode in
    eager) extra=() ;;
    compiled) extra=(--compile) ;;
    varlen-compiled) extra=(--compile --attn-implementation varlen) ;;  # torch's varlen kernel instead of flex
  esac
  SECONDS=0
  timeout 420 $PY train.py "${JOB[@]}" "${extra[@]}" --tokenizer "$out/tokenizer-run/tokenizer" \
    --output-dir "$out/$mode" > "$out/$mode.log" 2>&1
  echo "== $mode: rc $? in ${SECONDS}s"
  summary "$out/$mode" "$out/$mode.log"
done

# Ours against transformers at the default job's shape (a llama-family config with deepone's sizes), both compiled.
cat > "$out/deepone-shape.json" <<'JSON'
{"family": "llama", "vocab_size": 32768, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16,
 "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 96, "max_position_embeddings": 4096,
 "rope_theta": 10000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": false, "hidden_act": "silu"}
JSON
SECONDS=0
timeout 300 $PY bench/model_throughput.py --device cuda --config "$out/deepone-shape.json" --batch-size 4 \
  --seq-len 4096 --compile --steps 10 --json > "$out/versus-transformers.json" 2> "$out/versus-transformers.err"
echo "== ours vs transformers, compiled, flex: rc $? in ${SECONDS}s"
tail -1 "$out/versus-transformers.json"
