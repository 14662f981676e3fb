"""Kill train.py with SIGKILL at random moments (during startup, steps, evals and checkpoint writes) and resume.

Each trial starts a fresh tiny run that saves every step, kills it after a random delay, then checks that:
- every checkpoint that resume would consider either verifies or is skipped (never a damaged one loaded),
- the resumed run starts from the newest complete checkpoint and finishes,
- at most one save interval of logged training was lost.

    python bench/fault_injection.py --trials 20            # the benchmark; a handful of trials run in the tests
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor import checkpoint as ckpt  # noqa: E402
from tests.helpers import TINY  # noqa: E402

# Saves, evaluates and logs every step: kills land in checkpoint writes as often as in training steps.
RUN = [*TINY, *"--step-cadence 0.0002 --eval-batches 1 --sample-tokens 0 --max-steps 120 --seed 3".split()]


def logged_steps(output_dir: Path) -> list[int]:
    steps = []
    for log in sorted(output_dir.glob("runs/*/trainer_logs.jsonl")):
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if record.get("type") == "train":
                steps.append(record["step"])
    return steps


def run_trial(workdir: Path, delay: float, data_args: list[str]) -> dict:
    """One kill-and-resume trial; returns what happened (raises AssertionError when a guarantee is broken)."""
    out = workdir / "run"
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SMALL_LLM_JOBS_DIR": str(workdir / "jobs"),
    }
    (workdir / "jobs").mkdir(mode=0o700, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), *RUN, *data_args, "--output-dir", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--init-model"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(delay)
    finished_before_kill = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # What resume will see: every folder is either complete and verified, or skipped.
    root = out / "checkpoints"
    newest = ckpt.latest_checkpoint(root, warn=lambda m: None)
    damaged = [p.name for _, p in ckpt.checkpoint_dirs(root) if ckpt.verify(p) is not None]
    interrupted_saves = len(list(root.glob(".tmp-checkpoint-*"))) if root.is_dir() else 0
    saved_step = int(newest.name.split("-")[1]) if newest else 0
    before = logged_steps(out)
    lost = (max(before) if before else 0) - saved_step
    assert lost <= 1, f"lost {lost} logged steps (saves happen every step)"

    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if newest is not None:
        assert f"resumed from {newest}" in resumed.stdout, resumed.stdout[-2000:]
    assert (out / "final" / "model.safetensors").is_file()
    return {
        "delay_s": round(delay, 2),
        "finished_before_kill": finished_before_kill,
        "resumed_from_step": saved_step,
        "damaged_folders_skipped": damaged,
        "interrupted_saves": interrupted_saves,
        "lost_steps": lost,
    }


def make_data(workdir: Path) -> list[str]:
    """A small real-text corpus (standard-library docstrings) and a tokenizer trained once for all trials."""
    import json as json_module

    import data
    from tests.helpers import write_corpus

    corpus = write_corpus(workdir / "docs.jsonl")
    texts = [json_module.loads(line)["text"] for line in corpus.read_text().splitlines()]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), workdir / "tokenizer")
    return ["--dataset", str(corpus), "--tokenizer", str(workdir / "tokenizer")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="kill-and-resume trials")
    parser.add_argument("--max-delay", type=float, default=16.0, help="latest kill, seconds after start")
    parser.add_argument("--seed", type=int, default=0, help="seed for the kill times")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_args = make_data(Path(tmp))
        for i in range(args.trials):
            trial_dir = Path(tmp) / f"trial-{i}"
            trial_dir.mkdir()
            results.append(run_trial(trial_dir, rng.uniform(2.0, args.max_delay), data_args))
            if not args.json:
                print(f"trial {i + 1:2d}/{args.trials}: {results[-1]}", flush=True)
    damaged = sum(len(r["damaged_folders_skipped"]) for r in results)
    summary = {
        "trials": len(results),
        "all_resumed": True,
        "max_lost_steps": max(r["lost_steps"] for r in results),
        "damaged_folders_skipped": damaged,
        "kills_during_a_save": sum(r["interrupted_saves"] > 0 for r in results),
    }
    print(json.dumps({"summary": summary, "trials": results}) if args.json else f"summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
