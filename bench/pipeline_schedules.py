"""The six pipeline schedules on CPU: step time relative to 1F1B and peak memory per rank.

    python bench/pipeline_schedules.py            # 2 processes, ~3 min on 2 CPU cores
    python bench/pipeline_schedules.py --json     # one JSON object on stdout

Every schedule runs on the torch engine (torch.distributed.pipelining, 1F1B and GPipe through
`--pipeline-engine torch`) so that only the schedule differs. Each one is a `torchrun` launch of this file in worker
mode, which builds the real layout from train.py's own argument parsing (`parallel.TorchPipeline`) and times
`train_step` on the built-in corpus: a few warm-up steps, then the median of the timed ones. Memory is each rank's
peak resident set (`ru_maxrss`): weights, optimizer state, data and the schedule's in-flight activations.

The micro-batches follow the spec's formula, so the 2-stage-per-rank schedules run twice as many micro-batches of
half the rows as 1F1B and GPipe on the same --batch-size. On 2 shared CPU cores the ranks compete for the cores, so
the times say more about the amount of work and waiting per step than about a GPU's bubble.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ["1F1B", "GPipe", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble"]
# A model deep enough for 4 stages of 2 blocks: llama family, 8 blocks of width 256.
MODEL = {
    "family": "llama",
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def worker(argv: list[str], warmup: int, steps: int) -> None:
    """One rank of one schedule: build the layout as train.py does, time train_step, report to rank 0."""
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    import train
    from monitor.meter import Meter
    from parallel import TorchPipeline

    run = train.resolve_run(train.parse_args(argv))
    lay = TorchPipeline(run)
    lay.start_data(None)
    meter = Meter(run.model_cfg, run.plan.tokens_per_step, lay.process.world, None, lay.process.device)
    for _ in range(warmup):
        lay.train_step(meter)
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        lay.train_step(meter)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = {"rank": lay.process.rank, "stages": lay.stage_ids, "step_s": statistics.median(times), "peak": peak}
    everyone = [None] * lay.process.world
    dist.all_gather_object(everyone, mine)
    if lay.process.is_main:
        print("RESULT " + json.dumps(everyone), flush=True)
    lay.close()


def launch(schedule: str, common: list[str], out: Path, warmup: int, steps: int, procs: int) -> list[dict]:
    argv = [*common, "--pipeline-schedule", schedule, "--output-dir", str(out / schedule)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), __file__, "--worker",
           "--warmup", str(warmup), "--steps", str(steps), "--", *argv]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        sys.exit(f"{schedule} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2, help="processes (pipeline ranks)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.rest, args.warmup, args.steps)

    sys.path.insert(0, str(ROOT))
    import data
    from data.builtin import builtin_corpus_path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model.json").write_text(json.dumps(MODEL))
        with open(builtin_corpus_path()) as f:
            docs = [json.loads(line)["text"] for _, line in zip(range(5000), f, strict=False)]
        data.save_tokenizer(data.train_tokenizer(docs, vocab_size=MODEL["vocab_size"]), tmp / "tokenizer")
        common = ["--init-model", "--model-config", str(tmp / "model.json"), "--dataset", "builtin",
                  "--tokenizer", str(tmp / "tokenizer"), "--max-length", str(args.max_length), "--batch-size",
                  str(args.batch_size), "--optimizer", "adamw", "--pipeline", "--pipeline-engine", "torch",
                  "--max-steps", str(args.warmup + args.steps), "--sample-tokens", "0"]  # fmt: skip
        results = {s: launch(s, common, tmp, args.warmup, args.steps, args.procs) for s in SCHEDULES}
    base = max(r["step_s"] for r in results["1F1B"])
    table = {
        s: {
            "step_s": max(r["step_s"] for r in ranks),  # a step ends when the slowest rank does
            "relative": max(r["step_s"] for r in ranks) / base,
            "peak_mib": [round(r["peak"] / 2**20) for r in ranks],
            "stages": [r["stages"] for r in ranks],
        }
        for s, ranks in results.items()
    }
    if args.json:
        print(json.dumps(table))
        return
    print(f"{args.procs} processes, --batch-size {args.batch_size}, --max-length {args.max_length}, "
          f"{MODEL['num_hidden_layers']} blocks of {MODEL['hidden_size']}")  # fmt: skip
    print(f"{'schedule':<24}{'stages per rank':<18}{'step s':>8}{'vs 1F1B':>9}  peak MiB per rank")
    for s, row in table.items():
        stages = " ".join(",".join(map(str, st)) for st in row["stages"])
        peaks = " / ".join(map(str, row["peak_mib"]))
        print(f"{s:<24}{stages:<18}{row['step_s']:>8.3f}{row['relative']:>9.2f}  {peaks}")


if __name__ == "__main__":
    main()
