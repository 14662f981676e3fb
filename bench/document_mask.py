"""Document masking against plain causal attention over the packed row, on the optimizer benchmark's data.

The same tiny model, TinyStories data, tokenizer, schedule and budget, trained twice per seed: with attention kept
inside each document of a packed row (the default) and with `--no-document-mask` (attention crosses the documents
of a row, positions run 0..T-1: the spec's sdpa behaviour and the fastest kernel). The held-out loss is per
document in both (evaluation always masks), so the two numbers measure the same thing: how well the model predicts
a document on its own.

    python -m bench.document_mask                               # 3 seeds x 2 runs of 0.4M tokens, AdamW fp32
    python -m bench.document_mask --seeds 1,2,3,4,5 --tokens 0.0016 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench import optimizer_compare as oc

WAYS = [("masked", ()), ("unmasked", ("--no-document-mask",))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=oc.DEFAULT_DATA, help="training text file (TinyStories .txt)")
    p.add_argument("--tokens", type=float, default=0.0004, help="token budget per run, in billions")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (init and data order)")
    p.add_argument("--learning-rate", type=float, default=4e-4, help="base LR (peak = 4x at batch 16)")
    p.add_argument("--warmup-steps", type=int, default=30, help="LR warmup steps")
    p.add_argument("--evals", type=int, default=4, help="approximate number of evaluations per run")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    p.add_argument("--work-dir", type=Path, default=None, help="keep run outputs here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} not found; pass --data with a TinyStories .txt file", file=sys.stderr)
        return 2
    args.data = args.data.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="document_mask_") as tmp:
        work = args.work_dir.resolve() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = oc.train_tokenizer(args.data, work / "tokenizer", 4096)
        for seed in seeds:
            for way, extra in WAYS:
                print(f"running {way} seed {seed} ...", file=sys.stderr, flush=True)
                run_args = argparse.Namespace(**{**vars(args), "seed": seed})
                row = oc.run_one(f"{way}-{seed}", "adamw", "fp32", "-", run_args, tokenizer, work, extra=extra)
                rows.append({"way": way, "seed": seed, "eval_loss": row["eval_loss"], "wall_s": row["wall_s"]})
    losses = {way: [r["eval_loss"] for r in rows if r["way"] == way] for way, _ in WAYS}
    if any(loss is None for values in losses.values() for loss in values):
        print("error: a run failed; see its log (--work-dir keeps them)", file=sys.stderr)
        return 1
    gaps = [m / u - 1 for m, u in zip(losses["masked"], losses["unmasked"], strict=True)]
    summary = {way: {"mean": statistics.mean(v), "min": min(v), "max": max(v)} for way, v in losses.items()} | {
        "masked_vs_unmasked": {"mean": statistics.mean(gaps), "min": min(gaps), "max": max(gaps)}
    }
    if args.json:
        print(json.dumps({"tokens": args.tokens, "seeds": seeds, "runs": rows, "summary": summary}))
        return 0
    print(f"TinyStories, model tiny, {args.tokens * 1e9:,.0f} tokens per run, batch 16 x 256, AdamW fp32, CPU")
    print(f"{'seed':>4} {'masked':>8} {'unmasked':>9} {'masked/unmasked - 1':>20}")
    for seed, m, u, g in zip(seeds, losses["masked"], losses["unmasked"], gaps, strict=True):
        print(f"{seed:>4} {m:>8.4f} {u:>9.4f} {g:>+19.2%}")
    mean = summary["masked_vs_unmasked"]
    print(f"mean {summary['masked']['mean']:>8.4f} {summary['unmasked']['mean']:>9.4f} {mean['mean']:>+19.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
