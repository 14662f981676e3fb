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
TINY = (
    "--model tiny --max-length 64 --batch-size 4 --warmup-steps 2 --learning-rate 1e-3 --optimizer adamw "
    "--step-cadence 0.0006 --eval-batches 2 --sample-tokens 4 --seed 7"
).split()


# Two processes of DDP on the CPU (gloo), as the README launches them.
ACCELERATE = [
    PYTHON,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(ROOT / "accelerate_configs/cpu_ddp.yaml"),
]


def write_corpus(path: Path, max_docs: int = 3000) -> Path:
    """Docstrings of standard-library modules as a .jsonl corpus: real English, present on every machine."""
    import importlib

    docs, seen = [], set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            members = [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]
            for member in members:
                doc = inspect.getdoc(member) if callable(member) or inspect.ismodule(member) else None
                if doc and len(doc) > 120 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    with open(path, "w") as f:
        for doc in docs[:max_docs]:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


CORPUS_MODULES = (
    "argparse",
    "collections",
    "json",
    "pathlib",
    "subprocess",
    "unittest",
    "inspect",
    "typing",
    "functools",
    "itertools",
    "os",
    "shutil",
    "tarfile",
    "zipfile",
    "email",
    "http.client",
    "urllib.request",
    "logging",
    "threading",
    "asyncio",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "re",
    "string",
    "textwrap",
    "difflib",
    "csv",
    "configparser",
    "sqlite3",
    "socket",
    "ssl",
    "xml.dom.minidom",
    "doctest",
    "pdb",
    "pickle",
    "copy",
    "enum",
    "dataclasses",
    "contextlib",
    "abc",
    "io",
    "codecs",
    "locale",
    "calendar",
    "heapq",
    "bisect",
)


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


def padded_tokenizer(tokenizer, size: int):
    """`tokenizer` with unused entries appended to its BPE vocabulary up to `size` ids: the same encoding, and an
    embedding and head of a real vocabulary's size (loads as fast as the original, unlike added tokens)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, start = spec["model"]["vocab"], len(tokenizer)
    vocab.update({f"<|unused_{i}|>": start + i for i in range(size - start)})
    backend = Tokenizer.from_str(json.dumps(spec))
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)
