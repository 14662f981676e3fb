"""Optimizer comparison on TinyStories: pure-bf16 Adafactor (stochastic vs nearest rounding) against fp32 AdamW,
and a tokens-to-target race between AdamW, Adafactor and Muon.

    python bench/optimizer_compare.py                        # three runs of 1.6M tokens, 1.5-4 min each on 2 CPU cores
    python bench/optimizer_compare.py --tokens 0.0004 --json # shorter runs, one JSON object on stdout
    python bench/optimizer_compare.py --mode tokens-to-target --tokens 0.00008 --batch-size 8 --max-length 128 \
        --lrs 8e-4,1.6e-3,3.2e-3 --warmup-steps 5 --evals 10 --eval-batches 4     # 9 runs, ~2 min each on 2 cores

Tokens-to-target mode: AdamW (fp32), Adafactor (bf16 weights, stochastic rounding) and Muon (fp32; Muon on the
hidden matrices, AdamW on the rest) each train at three base LRs (--lrs) on the same data, tokenizer, seed and
budget, evaluating about --evals times. Each optimizer is represented by its best LR (lowest final eval loss); the
target is the best AdamW run's final eval loss, and the table gives the tokens each optimizer's best run needed to
first evaluate at or below it (at eval granularity, so an upper bound), as a fraction of AdamW's budget.

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
BATCH_SIZE = 16  # --batch-size
MAX_LENGTH = 256  # --max-length

# (name, optimizer, dtype, rounding): rounding is what Adafactor does when it writes bf16 weights ("-" for fp32).
RUNS = [
    ("adafactor-bf16-sr", "adafactor", "bf16", "stochastic"),
    ("adamw-fp32", "adamw", "fp32", "-"),
    ("adafactor-bf16-rtn", "adafactor", "bf16", "nearest"),
]
# The tokens-to-target race: the reference first.
RACE = [
    ("adamw-fp32", "adamw", "fp32", "-"),
    ("adafactor-bf16-sr", "adafactor", "bf16", "stochastic"),
    ("muon-fp32", "muon", "fp32", "-"),
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


def eval_curve(output_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every "eval" record in the run's trainer_logs.jsonl, in order."""
    curve = []
    for log in sorted(glob.glob(str(output_dir / "runs" / "*" / "trainer_logs.jsonl"))):
        for line in Path(log).read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "eval" and record.get("loss") is not None:
                curve.append((int(record["step"]), float(record["loss"])))
    return curve


def last_eval_loss(output_dir: Path) -> tuple[float | None, int | None]:
    """The loss and step of the last "eval" record in the run's trainer_logs.jsonl (None when there is none)."""
    curve = eval_curve(output_dir)
    return (curve[-1][1], curve[-1][0]) if curve else (None, None)


def run_one(
    name: str,
    optimizer: str,
    dtype: str,
    rounding: str,
    args,
    tokenizer: Path,
    work: Path,
    lr: float | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """Train one configuration to the token budget (`extra`: more train.py options); return its result row (status
    "ok", "unsupported" or "failed")."""
    lr = args.learning_rate if lr is None else lr
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
        str(args.warmup_steps),
        "--min-cooldown-tokens",
        "0",
        "--learning-rate",
        str(lr),
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
        str(args.eval_batches),
        "--step-cadence",
        f"{step_cadence(args.tokens, args.evals):.4g}",
    ]
    if rounding == "nearest":
        cmd.append(NO_SR_FLAG)
    cmd += extra
    row = {
        "name": name,
        "optimizer": optimizer,
        "dtype": dtype,
        "rounding": rounding,
        "learning_rate": lr,
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
    row["curve"] = eval_curve(output_dir)
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


def tokens_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """Tokens at the first evaluation whose loss is at or below `target` (None when it never is)."""
    return next((step * BATCH_SIZE * MAX_LENGTH for step, loss in curve if loss <= target), None)


def race(args, tokenizer: Path, work: Path) -> dict:
    """Every optimizer of RACE at every LR of --lrs; the best LR per optimizer; tokens to the best AdamW loss."""
    lrs = [float(x) for x in args.lrs.split(",")]
    rows = []
    for name, optimizer, dtype, rounding in RACE:
        for lr in lrs:
            print(f"running {name} at LR {lr:g} ...", file=sys.stderr, flush=True)
            rows.append(run_one(f"{name}-lr{lr:g}", optimizer, dtype, rounding, args, tokenizer, work, lr))
    best = {}
    for name, *_ in RACE:
        done = [r for r in rows if r["name"].startswith(name + "-lr") and r["status"] == "ok"]
        if done:
            best[name] = min(done, key=lambda r: r["eval_loss"])
    budget = args.tokens * 1e9
    target = best["adamw-fp32"]["eval_loss"] if "adamw-fp32" in best else None
    summary = []
    for name, optimizer, dtype, rounding in RACE:
        if name not in best:
            continue
        r = best[name]
        tokens = tokens_to(r["curve"], target) if target is not None else None
        summary.append({
            "name": name, "optimizer": optimizer, "dtype": dtype, "rounding": rounding,
            "best_learning_rate": r["learning_rate"], "eval_loss": r["eval_loss"],
            "sweep": {f"{x['learning_rate']:g}": x["eval_loss"] for x in rows if x["name"].startswith(name + "-lr")},
            "tokens_to_target": tokens,
            "fraction_of_budget": None if tokens is None else round(tokens / budget, 3),
        })  # fmt: skip
    return {"target": target, "budget_tokens": int(budget), "runs": rows, "summary": summary}


def print_race(result: dict, args) -> None:
    print(
        f"TinyStories 4MB, model tiny, {result['budget_tokens']:,} tokens per run, batch {BATCH_SIZE} x {MAX_LENGTH}, "
        f"base LRs {args.lrs} (peak = x{BATCH_SIZE**0.5:.2f}), seed {args.seed}, CPU; "
        f"target = best AdamW final eval loss {result['target']}"
    )
    head = f"{'optimizer':<10} {'dtype':<5} {'best LR':>8} {'eval loss':>9} {'tokens to target':>17} {'of budget':>9}"
    print(head + "  sweep")
    for r in result["summary"]:
        tokens = f"{r['tokens_to_target']:,}" if r["tokens_to_target"] is not None else "not reached"
        frac = f"{r['fraction_of_budget']:.0%}" if r["fraction_of_budget"] is not None else "-"
        sweep = ", ".join(f"{lr}: {loss:.4f}" if loss is not None else f"{lr}: -" for lr, loss in r["sweep"].items())
        print(
            f"{r['optimizer']:<10} {r['dtype']:<5} {r['best_learning_rate']:>8g} {r['eval_loss']:>9.4f} "
            f"{tokens:>17} {frac:>9}  {sweep}"
        )


def main(argv: list[str] | None = None) -> int:
    global BATCH_SIZE, MAX_LENGTH
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
    p.add_argument("--mode", default="rounding", choices=["rounding", "tokens-to-target"], help="which comparison")
    p.add_argument("--lrs", default="4e-4,8e-4,1.6e-3", help="tokens-to-target: base LRs swept per optimizer")
    p.add_argument("--warmup-steps", type=int, default=30, help="LR warmup steps of every run")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sequences per step")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per sequence")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    args = p.parse_args(argv)
    BATCH_SIZE, MAX_LENGTH = args.batch_size, args.max_length

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
        if args.mode == "tokens-to-target":
            result = race(args, tokenizer, work)
            if args.json:
                print(json.dumps({"data": str(args.data), "tokens": args.tokens, "seed": args.seed, **result}))
            else:
                print_race(result, args)
            return 0 if all(r["status"] == "ok" for r in result["runs"]) else 1
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
