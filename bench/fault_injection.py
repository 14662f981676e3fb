"""Kill train.py with SIGKILL at random moments and resume; every trial must recover.

--phase anywhere (default): a fresh tiny run that saves every step is killed after a random delay (startup, steps,
evals, checkpoint writes). Checks: every checkpoint resume would consider verifies or is skipped, the resumed run
starts from the newest complete checkpoint and finishes, at most one save interval of logged training was lost.

--phase export: a finished run (with a good final/) is extended; the kill lands while the new final/ is being written
(the staging folder .tmp-final exists). Checks: final/ loads in transformers after the kill, and the resumed run
finishes with a new export.

--phase rollback: a run whose LR is spiked into a NaN rolls back to its newest checkpoint; the kill lands in the
divergence handling (between the divergence event and the next save). Checks: no checkpoint holds non-finite weights,
and the resumed run finishes.

    python bench/fault_injection.py --trials 20 [--phase export|rollback]
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

from lifecycle import checkpoint as ckpt  # noqa: E402
from tests.helpers import TINY  # noqa: E402

# Saves, evaluates and logs every step: kills land in checkpoint writes as often as in training steps.
BASE = [*TINY, *"--step-cadence 0.0002 --eval-batches 1 --sample-tokens 0 --seed 3".split()]
RUN = [*BASE, "--max-steps", "120"]


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


def _environment(workdir: Path) -> dict:
    (workdir / "jobs").mkdir(mode=0o700, exist_ok=True)
    return os.environ | {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SMALL_LLM_JOBS_DIR": str(workdir / "jobs"),
    }


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 300.0, poll: float = 0.001) -> bool:
    """Poll until `ready()` or the process ends; True when ready while the process still ran."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return proc.poll() is None
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("the trial never reached the phase to kill")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def export_trial(workdir: Path, delay: float, data_args: list[str]) -> dict:
    """Kill inside the final export of an extended run: the previous final/ (or the new one) always loads."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out, env = workdir / "run", _environment(workdir)
    base = [sys.executable, str(ROOT / "train.py"), *BASE, *data_args, "--output-dir", str(out)]
    first = subprocess.run([*base, "--init-model", "--max-steps", "4"], cwd=ROOT, env=env, capture_output=True)
    assert first.returncode == 0, first.stderr[-2000:]
    proc = subprocess.Popen(
        [*base, "--max-steps", "8"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    staging = out / ".tmp-final"
    started = _wait_for(proc, staging.exists)
    time.sleep(delay)
    inside = staging.exists() and proc.poll() is None
    _kill(proc)
    AutoConfig.from_pretrained(out / "final")  # a complete export, old or new: config and weights both read
    assert load_file(out / "final" / "model.safetensors")
    resumed = subprocess.run([*base, "--max-steps", "8"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    AutoConfig.from_pretrained(out / "final")
    return {"delay_s": round(delay, 4), "export_started": started, "kill_inside_export": inside}


def rollback_trial(workdir: Path, delay: float, data_args: list[str]) -> dict:
    """Kill while a divergence is handled by rollback: never a non-finite checkpoint, and the resume finishes."""
    import torch
    from safetensors.torch import load_file

    out, env = workdir / "run", _environment(workdir)
    spike = ["--inject-lr-spike", "6,1e30", "--divergence-action", "rollback"]
    cmd = [sys.executable, str(ROOT / "train.py"), *BASE, "--max-steps", "12", *spike, *data_args]
    cmd += ["--output-dir", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--init-model"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def diverged() -> bool:
        return any('"divergence"' in line for line in _log_lines(out))

    started = _wait_for(proc, diverged, poll=0.005)
    time.sleep(delay)
    rolled_back = any('"rollback"' in line for line in _log_lines(out))
    _kill(proc)
    for _, folder in ckpt.checkpoint_dirs(out / "checkpoints"):
        if ckpt.verify(folder) is None:
            weights = load_file(folder / "model-0.safetensors")
            assert all(torch.isfinite(t).all() for t in weights.values()), f"non-finite weights in {folder}"
    resume = [a for a in cmd if a not in spike[:2]]  # a user resumes without the testing aid that caused the blow-up
    resumed = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    return {"delay_s": round(delay, 3), "killed_in_divergence": started, "rollback_logged_before_kill": rolled_back}


def _log_lines(output_dir: Path) -> list[str]:
    lines = []
    for log in output_dir.glob("runs/*/trainer_logs.jsonl"):
        lines += log.read_text().splitlines()
    return lines


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
    parser.add_argument("--phase", default="anywhere", choices=["anywhere", "export", "rollback"], help="kill where")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_args = make_data(Path(tmp))
        for i in range(args.trials):
            trial_dir = Path(tmp) / f"trial-{i}"
            trial_dir.mkdir()
            if args.phase == "export":
                result = export_trial(trial_dir, rng.uniform(0.0, 0.03), data_args)
            elif args.phase == "rollback":
                result = rollback_trial(trial_dir, rng.uniform(0.0, 0.06), data_args)
            else:
                result = run_trial(trial_dir, rng.uniform(2.0, args.max_delay), data_args)
            results.append(result)
            if not args.json:
                print(f"trial {i + 1:2d}/{args.trials}: {results[-1]}", flush=True)
    if args.phase != "anywhere":
        key = "kill_inside_export" if args.phase == "export" else "killed_in_divergence"
        summary = {"trials": len(results), "all_recovered": True, "kills_in_phase": sum(r[key] for r in results)}
        print(json.dumps({"summary": summary, "trials": results}) if args.json else f"summary: {summary}")
        return 0
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
