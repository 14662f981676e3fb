#!/usr/bin/env bash
# Training-step throughput on one CUDA GPU, ours vs transformers (bench/model_throughput.py, bf16, llama-30m,
# 8 x 2048 tokens), in up to six modes: eager with flex_attention and with sdpa, and compiled with each kernel, ours'
# loss path whole (as train.py --compile does) or each decoder block alone; transformers' model is compiled whole.
# Recompile reasons of the compiled runs are logged to MODE.err (TORCH_LOGS=recompiles).
#     bash bench/gpu_throughput.sh [OUT_DIR [MODE ...]]     # default: all six modes
set -uo pipefail
out=${1:-/tmp/gpu-throughput}
shift || true
modes=("${@:-eager-flex eager-sdpa compiled-sdpa-blocks compiled-sdpa-loss-path compiled-flex-blocks compiled-flex-loss-path}")
modes=(${modes[*]})
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L
run() {
  local name=$1; shift; echo "== $name: $*"; SECONDS=0
  timeout 240 $PY bench/model_throughput.py --device cuda --steps 10 --json "$@" >"$out/$name.json" 2>"$out/$name.err"
  echo "rc $? in ${SECONDS}s; $(grep -c "Recompiling function" "$out/$name.err") recompile log lines"
  $PY - "$out/$name.json" <<'PY'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e:
    sys.exit(f"no result ({e})")
for k in ("ours", "transformers"):
    print(f"  {k}: {r[k]['tokens_per_s']:,.0f} tokens/s, MFU {r[k]['mfu']:.1%}, peak {r[k]['peak_mem_gib']:.1f} GiB")
print(f"  ratio {r['ratio_ours_over_transformers']:.3f}; warm-up s {r['warmup_s']}; graphs {r['graphs_compiled']}, "
      f"recompiles while timed {r['recompiles_while_timed']}")
PY
}
for mode in "${modes[@]}"; do
  case $mode in
    eager-flex) run "$mode" ;;
    eager-sdpa) run "$mode" --attn-implementation sdpa ;;
    compiled-sdpa-blocks) TORCH_LOGS=recompiles run "$mode" --attn-implementation sdpa --compile --compile-ours blocks ;;
    compiled-sdpa-loss-path) TORCH_LOGS=recompiles run "$mode" --attn-implementation sdpa --compile --compile-ours loss-path ;;
    compiled-flex-blocks) TORCH_LOGS=recompiles run "$mode" --compile --compile-ours blocks ;;
    compiled-flex-loss-path) TORCH_LOGS=recompiles run "$mode" --compile --compile-ours loss-path ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
done
