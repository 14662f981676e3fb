"""What every layout builds from: the resolved run, bad-input errors, and the seeded model, optimizer and tokenizer."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import models
import schedule


class UsageError(ValueError):
    """Bad input: reported in one line with exit code 2."""


@dataclass
class Run:
    """Everything main() resolves before training, from the arguments alone; read-only afterwards."""

    args: argparse.Namespace
    plan: schedule.Plan
    pipeline: schedule.PipelineGeometry | None  # None: data parallel
    model_cfg: models.ModelConfig
    mix: data.Mix | None  # None under --dry-run (no data is touched)
    tokenizer: str | None  # --tokenizer, or the --init-from model's own
    output_dir: Path
    resume_from: Path | None
    world_size: int
    memory: dict[str, int]  # models.memory.estimate_memory for this layout, bytes per device


@contextlib.contextmanager
def bad_input():
    """ValueError/FileNotFoundError from reading user-supplied things (data, tokenizer, configs) is bad input."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def build_tokenizer(run: Run, is_main: bool, barrier):
    """Load --tokenizer, reuse the run's own, or train one from the data (the main rank trains, the others wait)."""

    def resolve():
        with bad_input():
            return data.resolve_tokenizer(
                run.tokenizer, run.mix, run.output_dir, vocab_size=run.args.vocab_size, max_docs=run.args.tokenizer_docs
            )

    tok = resolve() if is_main else None
    barrier()
    return tok if is_main else resolve()


def build_model(run: Run, dtype: torch.dtype) -> models.Transformer:
    """The same initial weights on every rank and in every layout: seeded, built on the CPU."""
    torch.manual_seed(run.args.seed)
    if run.args.init_from:
        model, _ = models.load_hf(run.args.init_from, run.args.attn_implementation)
    else:
        model = models.Transformer(run.model_cfg, attn_implementation=run.args.attn_implementation)
        model.init_weights()
    return model.to(dtype=dtype)


def build_optimizer(run: Run, module: torch.nn.Module) -> torch.optim.Optimizer:
    args = run.args
    return schedule.build_optimizer(
        args.optimizer,
        module,
        run.plan.max_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        stochastic_rounding=not args.no_stochastic_rounding,
    )


def precision(args: argparse.Namespace, device_type: str) -> tuple[torch.dtype, bool]:
    """(training dtype, pure bf16): Adafactor on bf16 keeps bf16 weights; AdamW on bf16 is bf16 autocast."""
    dtype = schedule.resolve_dtype(args.dtype, device_type)
    return dtype, dtype == torch.bfloat16 and args.optimizer == "adafactor"


def label_count(batches: list[dict]) -> float:
    return float(sum(int((b["labels"] != data.IGNORE_INDEX).sum()) for b in batches))
