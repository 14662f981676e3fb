"""Optimizer comparison on TinyStories: pure-bf16 Adafactor (stochastic vs nearest rounding) against fp32 AdamW.

    python bench/optimizer_compare.py                        # three runs of 1.6M tokens, 1.5-4 min each on 2 CPU cores
    python bench/optimizer_compare.py --tokens 0.0004 --json # shorter runs, one JSON object on stdout

Runs `train.py` once per configuration, as a subprocess, on the same data, tokenizer, model, seed and token budget:
  1. adafactor / bf16 weights / stochastic rounding (the default update rule and dtype on GPU),
  2. adamw / fp32 weights (the reference),
  3. adafactor / bf16 weights / round-to-nearest (`--no-stochastic-rounding`).
With `--dtype bf16` Adafactor trains "pure bf16": the weights themselves are bf16 and each update is computed in fp32
and rounded back, so round-to-nearest silently drops updates smaller than half a bf16 ulp of the weight, which
stochastic rounding keeps in expectation. The table reports each run's last eval loss (the held-out batches of the
same file) and its ratio to the AdamW fp32 loss.

Learning rate: one base LR (--learning-rate, default 4e-4) for all three runs; train.py scales it by
sqrt(global batch) = 4, so the peak is 1.6e-3 for a 1.3M-parameter model. Adafactor's LR is absolute (no
relative-step scaling), so the same number means a comparable step size for both families; neither diverges there.
"""

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinystories" / "train_lowercase_4mb.txt"
BATCH_SIZE = 16
MAX_LENGTH = 256

# (name, optimizer, dtype, rounding): rounding is what Adafactor does when it writes bf16 weights ("-" for fp32).
RUNS = [
    ("adafactor-bf16-sr", "adafactor", "bf16", "stochastic"),
    ("adamw-fp32", "adamw", "fp32", "-"),
    ("adafactor-bf16-rtn", "adafactor", "bf16", "nearest"),
]
NO_SR_FLAG = "--no-stochastic-rounding"


def train_tokenizer(data_path: Path, out_dir: Path, vocab_size: int) -> Path:
    """Train the byte-level BPE tokenizer every run shares, so all runs see exactly the same tokens."""
    cmd = [
        sys.executable,
        "-m",
        "data.tokenizer",
        "train",
        "--dataset",
        str(data_path),
        "--vocab-size",
        str(vocab_size),
        "--output",
        str(out_dir),
        "--max-docs",
        "20000",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return out_dir


def step_cadence(tokens_b: float, evals: int) -> float:
    """The --step-cadence that puts about `evals` evaluations in the run (train.py evals every 1000 x cadence rows)."""
    steps = tokens_b * 1e9 / (BATCH_SIZE * MAX_LENGTH)
    return max(steps / evals, 1.0) * BATCH_SIZE / 1000


def last_eval_loss(output_dir: Path) -> tuple[float | None, int | None]:
    """The loss and step of the last "eval" record in the run's trainer_logs.jsonl (None when there is none)."""
    loss, step = None, None
    for log in sorted(glob.glob(str(output_dir / "runs" / "*" / "trainer_logs.jsonl"))):
        for line in Path(log).read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "eval" and record.get("loss") is not None:
                loss, step = float(record["loss"]), int(record["step"])
    return loss, step


def run_one(name: str, optimizer: str, dtype: str, rounding: str, args, tokenizer: Path, work: Path) -> dict:
    """Train one configuration to the token budget; return its result row (status "ok", "unsupported" or "failed")."""
    output_dir = work / name
    cmd = [
        sys.executable,
        "train.py",
        "--init-model",
        "--overwrite-output-dir",
        "--output-dir",
        str(output_dir),
        "--dataset",
        str(args.data),
        "--tokenizer",
        str(tokenizer),
        "--model",
        "tiny",
        "--max-length",
        str(MAX_LENGTH),
        "--batch-size",
        str(BATCH_SIZE),
        "--total-tokens",
        str(args.tokens),
        "--warmup-steps",
        "30",
        "--min-cooldown-tokens",
        "0",
        "--learning-rate",
        str(args.learning_rate),
        "--optimizer",
        optimizer,
        "--dtype",
        dtype,
        "--seed",
        str(args.seed),
        "--sample-tokens",
        "0",
        "--save-strategy",
        "no",
        "--eval-batches",
        "8",
        "--step-cadence",
        f"{step_cadence(args.tokens, args.evals):.4g}",
    ]
    if rounding == "nearest":
        cmd.append(NO_SR_FLAG)
    row = {
        "name": name,
        "optimizer": optimizer,
        "dtype": dtype,
        "rounding": rounding,
        "eval_loss": None,
        "eval_step": None,
        "ratio_to_adamw": None,
        "wall_s": None,
    }
    log_path = work / f"{name}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    output = log_path.read_text()
    if proc.returncode == 2 and "unrecognized arguments" in output and NO_SR_FLAG in output:
        row["status"] = "unsupported"
        print(f"{name}: train.py does not accept {NO_SR_FLAG} yet; skipping the round-to-nearest run", file=sys.stderr)
        return row
    row["eval_loss"], row["eval_step"] = last_eval_loss(output_dir)
    row["status"] = "ok" if proc.returncode == 0 and row["eval_loss"] is not None else "failed"
    if row["status"] == "failed":
        tail = "\n".join(output.splitlines()[-5:])
        print(f"{name}: train.py exited with {proc.returncode} (log {log_path}):\n{tail}", file=sys.stderr)
    return row


def print_table(rows: list[dict], args) -> None:
    """Human-readable table, one line per run."""
    print(
        f"TinyStories 4MB, model tiny, {args.tokens * 1e9:,.0f} tokens, batch {BATCH_SIZE} x {MAX_LENGTH}, "
        f"base LR {args.learning_rate:g} (peak {args.learning_rate * BATCH_SIZE**0.5:g}), seed {args.seed}, CPU"
    )
    print(f"{'optimizer':<10} {'dtype':<5} {'rounding':<10} {'eval loss':>9} {'vs adamw':>8} {'wall':>7}  status")
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        ratio = f"{r['ratio_to_adamw']:.4f}" if r["ratio_to_adamw"] is not None else "-"
        print(
            f"{r['optimizer']:<10} {r['dtype']:<5} {r['rounding']:<10} {loss:>9} {ratio:>8} {r['wall_s']:>6.0f}s  "
            f"{r['status']}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="training text file (documents split by blank lines)"
    )
    p.add_argument("--tokens", type=float, default=0.0016, help="token budget per run, in billions (0.0016 = 1.6M)")
    p.add_argument("--learning-rate", type=float, default=4e-4, help="base LR for every run (peak = 4x at batch 16)")
    p.add_argument("--evals", type=int, default=4, help="approximate number of evaluations per run")
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order (same for every run)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder/file (default: train a 4096 one)")
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="comma-separated subset of the run names")
    p.add_argument("--work-dir", type=Path, default=None, help="keep run outputs and logs here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)

    if not args.data.is_file():
        print(f"error: {args.data} not found; pass --data with a TinyStories .txt file", file=sys.stderr)
        return 2
    wanted = args.runs.split(",")
    unknown = sorted(set(wanted) - {r[0] for r in RUNS})
    if unknown:
        print(f"error: unknown run(s) {unknown}; choose from {[r[0] for r in RUNS]}", file=sys.stderr)
        return 2
    args.data = args.data.resolve()

    with tempfile.TemporaryDirectory(prefix="optimizer_compare_") as tmp:
        work = args.work_dir.resolve() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = args.tokenizer.resolve() if args.tokenizer else train_tokenizer(args.data, work / "tokenizer", 4096)
        rows = []
        for name, optimizer, dtype, rounding in RUNS:
            if name in wanted:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                rows.append(run_one(name, optimizer, dtype, rounding, args, tokenizer, work))

    reference = next((r["eval_loss"] for r in rows if r["name"] == "adamw-fp32" and r["status"] == "ok"), None)
    for r in rows:
        if reference is not None and r["eval_loss"] is not None:
            r["ratio_to_adamw"] = round(r["eval_loss"] / reference, 4)
    if args.json:
        print(
            json.dumps(
                {
                    "data": str(args.data),
                    "tokens": args.tokens,
                    "learning_rate": args.learning_rate,
                    "seed": args.seed,
                    "batch_size": BATCH_SIZE,
                    "max_length": MAX_LENGTH,
                    "runs": rows,
                }
            )
        )
    else:
        print_table(rows, args)
    return 0 if all(r["status"] != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
