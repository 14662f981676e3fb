"""Shared helpers for the end-to-end tests: a small real-text corpus, a tokenizer, and train.py launchers."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A tiny run: logs and evaluates every step, saves every 3 steps (cadence 0.0006 x 20000 / 4 sequences = 3).
TINY = [
    "--model", "tiny", "--max-length", "64", "--batch-size", "4", "--warmup-steps", "2",
    "--learning-rate", "1e-3", "--optimizer", "adamw", "--step-cadence", "0.0006", "--eval-batches", "2",
    "--sample-tokens", "4", "--seed", "7",
]


def write_corpus(path: Path, max_docs: int = 400) -> Path:
    """Docstrings of the standard library as a .jsonl corpus: real English, present on every machine."""
    import argparse
    import collections
    import json as json_module
    import pathlib
    import subprocess as subprocess_module
    import unittest

    docs = []
    for module in (argparse, collections, json_module, pathlib, subprocess_module, unittest, inspect):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and doc not in docs:
                docs.append(doc)
    docs = docs[:max_docs]
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def train(*args: str, env: dict | None = None, launcher: list[str] | None = None, timeout: int = 600):
    """Run train.py in a subprocess; returns the CompletedProcess (never raises on a non-zero exit)."""
    cmd = (launcher or [PYTHON]) + [str(ROOT / "train.py"), *args]
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"} | (env or {})
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_losses(output_dir: Path) -> dict[int, float]:
    """step -> logged training loss, from the newest run directory of an output dir."""
    runs = sorted((output_dir / "runs").iterdir())
    records = [json.loads(line) for line in (runs[-1] / "trainer_logs.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}
