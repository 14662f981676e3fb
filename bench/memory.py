"""Peak memory and step time of 2-process DDP against 2-process FSDP, with and without activation checkpointing.

Each configuration is a real `accelerate launch` of train.py (cpu_ddp.yaml or cpu_fsdp.yaml: 2 gloo processes on
CPU). This script samples the resident memory of both ranks from outside every few milliseconds, once the first
step is logged (so model building and the first allocation of optimizer state do not count), and reads the step
time from the run's log. Separately, in one process, it measures the activation memory a forward pass keeps for the
backward (the bytes of every tensor autograd saves) and the resident memory a forward and backward add at their
peak, with and without checkpointing.

    python -m bench.memory                                  # llama-124m, 1,024 tokens, 1 sequence per rank
    python -m bench.memory --model llama-30m --steps 3 --json

NOTE: glibc keeps freed memory of mid-sized allocations for reuse, which hides what a step frees; the runs set
MALLOC_MMAP_THRESHOLD_ (this script too) so that tensors are mapped and unmapped on their own and the resident size
follows them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from tests.helpers import write_corpus  # noqa: E402

LAUNCHERS = {"ddp": "cpu_ddp.yaml", "fsdp": "cpu_fsdp.yaml"}


def saved_activation_bytes(cfg, seq_len: int, checkpointing: bool) -> int:
    """Bytes of the tensors one forward of 1 x seq_len tokens keeps for the backward pass (weights excluded)."""
    torch.manual_seed(0)
    model = models.Transformer(cfg, activation_checkpointing=checkpointing)
    model.init_weights()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids)
    del loss
    return sum(seen.values())


def step_peak_bytes(cfg, seq_len: int, checkpointing: bool) -> int:
    """Resident memory a forward and backward of 1 x seq_len tokens adds at its peak (activations and gradients).

    One process, sampled every millisecond by a thread; the baseline is taken after a first step, so that weights
    and the allocator's own start-up are not counted.
    """
    import threading

    torch.manual_seed(0)
    model = models.Transformer(cfg, activation_checkpointing=checkpointing)
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len))
    model(ids, labels=ids).backward()
    model.zero_grad(set_to_none=True)
    pid, peak, done = os.getpid(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.001)

    base = _rss(pid)
    thread = threading.Thread(target=sample)
    thread.start()
    model(ids, labels=ids).backward()
    done.set()
    thread.join()
    return peak[0] - base


def _children(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        tree.append(p)
        frontier += [c for c, parent in parents.items() if parent == p]
    return tree


def _rank_pids(launcher_pid: int) -> list[int]:
    pids = []
    for pid in _children(launcher_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"train.py") for c in cmd) and not any(b"accelerate" in c for c in cmd):
            pids.append(pid)
    return pids


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _train_records(out: Path) -> list[dict]:
    logs = sorted(out.glob("runs/*/trainer_logs.jsonl"))
    if not logs:
        return []
    records = []
    for line in logs[-1].read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train":
            records.append(record)
    return records


def measure(layout: str, checkpointing: bool, args, data_args: list[str], workdir: Path) -> dict:
    """One 2-process run: peak resident memory per rank from step 2 on, and the mean step time from step 2 on."""
    out = workdir / f"{layout}-{'ac' if checkpointing else 'plain'}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" /
           LAUNCHERS[layout]), str(ROOT / "train.py"), "--init-model", "--model", args.model, *data_args,
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--optimizer", "adamw",
           "--max-steps", str(args.steps), "--warmup-steps", "1", "--save-strategy", "no", "--eval-batches", "1",
           "--step-cadence", "0.0001", "--sample-tokens", "0", "--output-dir", str(out)]  # fmt: skip
    if checkpointing:
        cmd.append("--activation-checkpointing")
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
                        "MALLOC_MMAP_THRESHOLD_": "65536"}  # fmt: skip
    with open(workdir / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        peaks: dict[int, int] = {}
        ranks: list[int] = []
        while proc.poll() is None:
            if len(ranks) < 2:
                ranks = _rank_pids(proc.pid)
            elif peaks or _train_records(out):  # the first step is done: optimizer state exists
                for pid in ranks:
                    peaks[pid] = max(peaks.get(pid, 0), _rss(pid))
            time.sleep(0.005)
    if proc.returncode != 0:
        raise RuntimeError(f"{layout} run failed; see {workdir / out.name}.log")
    records = _train_records(out)[1:]
    tokens_per_step = args.max_length * args.batch_size * 2
    step_s = sum(tokens_per_step / r["tokens_per_s"] for r in records) / len(records)
    return {
        "layout": layout,
        "activation_checkpointing": checkpointing,
        "peak_rss_gib_per_rank": round(max(peaks.values()) / 2**30, 3),
        "step_s": round(step_s, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-124m", help="named model config")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per rank")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (the first is not measured)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained here")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-launch", action="store_true", help="only the one-process activation measurements")
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # read by glibc at start: run again with it set
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, "-m", "bench.memory", *sys.argv[1:]], env)

    import data

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus = write_corpus(workdir / "docs.jsonl")
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        tokenizer = data.train_tokenizer(texts, vocab_size=args.vocab_size)
        data.save_tokenizer(tokenizer, workdir / "tokenizer")
        data_args = ["--dataset", str(corpus), "--tokenizer", str(workdir / "tokenizer")]
        cfg = models.load_model_config(args.model, vocab_size=len(tokenizer))
        saved = {ac: saved_activation_bytes(cfg, args.max_length, ac) for ac in (False, True)}
        step = {ac: step_peak_bytes(cfg, args.max_length, ac) for ac in (False, True)}
        results = {
            "model": args.model,
            "vocab_size": cfg.vocab_size,
            "tokens": args.max_length,
            "parameters": models.count_parameters(cfg)["total"],
            "saved_activations_mib": {
                "plain": round(saved[False] / 2**20, 1),
                "checkpointed": round(saved[True] / 2**20, 1),
            },
            "forward_backward_peak_mib": {
                "plain": round(step[False] / 2**20, 1),
                "checkpointed": round(step[True] / 2**20, 1),
            },
            "runs": [],
        }
        if not args.json:
            print({k: v for k, v in results.items() if k != "runs"}, flush=True)
        for layout in () if args.no_launch else ("ddp", "fsdp"):
            for ac in (False, True):
                results["runs"].append(measure(layout, ac, args, data_args, workdir))
                if not args.json:
                    print(results["runs"][-1], flush=True)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"activations saved for the backward, one forward of {args.max_length} tokens: "
              f"{results['saved_activations_mib']['plain']} MiB plain, "
              f"{results['saved_activations_mib']['checkpointed']} MiB checkpointed")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
