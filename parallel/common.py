"""What every layout builds from: the resolved run, bad-input errors, and the seeded model, optimizer and tokenizer."""

from __future__ import annotations

import argparse
import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import models
import schedule
from data.tokenizer import tokenizer_hash
from monitor.outdir import OutputDirLock, publish_dir
from monitor.progress import say


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
    lock: OutputDirLock | None = None  # held by the main process for the run's life
    resume_changes: list[str] = field(default_factory=list)  # settings changed since the checkpoint resumed


@contextlib.contextmanager
def bad_input():
    """ValueError/FileNotFoundError from reading user-supplied things (data, tokenizer, configs) is bad input."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def build_tokenizer(run: Run, is_main: bool, barrier):
    """--tokenizer, else the run's own `tokenizer/` (never for --init-model), else one trained from the data.

    The main process decides; a tokenizer that differs from the run's saved one is staged beside it, the other
    processes load it from there, and `publish_tokenizer` moves it into `tokenizer/` only once the whole start has
    been validated, so a refused start never replaces the tokenizer a run's checkpoints were trained with.
    """
    saved, staging = run.output_dir / "tokenizer", run.output_dir / STAGING
    staged = staging / "tokenizer"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        with bad_input():
            if run.tokenizer:
                tok = data.load_tokenizer(run.tokenizer)
            elif (saved / "tokenizer.json").is_file() and not run.args.init_model:
                tok = data.load_tokenizer(saved)
            else:  # trained (or taken from a token cache) and saved into the staging folder
                tok = data.resolve_tokenizer(
                    None, run.mix, staging, vocab_size=run.args.vocab_size, max_docs=run.args.tokenizer_docs, log=say
                )
            if not staged.is_dir() and not _same_tokenizer(tok, saved):
                data.save_tokenizer(tok, staged)
    barrier()
    if is_main:
        return tok
    with bad_input():
        return data.load_tokenizer(run.tokenizer or (staged if staged.is_dir() else saved))


STAGING = ".tmp-start"  # what a start writes before it is known to be valid


def _same_tokenizer(tok, folder: Path) -> bool:
    if not (folder / "tokenizer.json").is_file():
        return False
    try:
        return tokenizer_hash(data.load_tokenizer(folder)) == tokenizer_hash(tok)
    except (ValueError, OSError):
        return False


def staged_tokenizer(output_dir: Path) -> bool:
    """True when this start trained or brought a tokenizer that `publish_tokenizer` will move into place."""
    return (output_dir / STAGING / "tokenizer").is_dir()


def publish_tokenizer(output_dir: Path) -> None:
    """Move a staged tokenizer into `tokenizer/` (atomically); call on the main process once the start is valid."""
    staged = output_dir / STAGING / "tokenizer"
    if staged.is_dir():
        with publish_dir(output_dir / "tokenizer") as folder:
            shutil.copytree(staged, folder, dirs_exist_ok=True)
    shutil.rmtree(output_dir / STAGING, ignore_errors=True)


def build_model(run: Run, dtype: torch.dtype) -> models.Transformer:
    """The same initial weights on every rank and in every layout: seeded, built on the CPU."""
    torch.manual_seed(run.args.seed)
    if run.args.init_from:
        model, _ = models.load_hf(run.args.init_from, run.args.attn_implementation)
    else:
        model = models.Transformer(run.model_cfg, attn_implementation=run.args.attn_implementation)
        model.init_weights()
    for block in model.layers:
        block.activation_checkpointing = run.args.activation_checkpointing
    if run.args.activation_checkpointing:
        say("activation checkpointing: each block's activations are recomputed in the backward pass")
    return model.to(dtype=dtype)


def assemble_model(run: Run, parts, dtype: torch.dtype) -> models.Transformer:
    """The whole model from the named weights each rank sent (None from ranks that hold none); where two parts hold
    the same name (tied copies), the later part's tensor is kept."""
    model = models.Transformer(run.model_cfg, run.args.attn_implementation)
    model.load_state_dict({name: t for part in parts if part for name, t in part.items()})
    return model.to(dtype)


def data_streams(run: Run, tokenizer, rows: int, rank: int, world: int, train: bool = True):
    """(training stream or None without `train`, held-out batches) of `rows` rows each, for shard `rank` of `world`.

    Reading a bad file or line is one clear error (bad_input).
    """
    args = run.args
    with bad_input():
        stream = None
        if train:
            stream = data.PackedStream(
                run.mix, tokenizer, args.max_length, rows, rank=rank, world_size=world, seed=args.seed,
                dispatch=args.dispatch_batches,
            )  # fmt: skip
        evals = data.eval_batches(
            run.mix, tokenizer, args.max_length, rows, args.eval_batches, rank=rank, world_size=world
        )
    return stream, evals


def build_optimizer(run: Run, module: torch.nn.Module) -> torch.optim.Optimizer:
    args = run.args
    with bad_input():  # e.g. Muon on sharded parameters
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


def micro_batches(batches: list[dict], rows: int) -> list[dict]:
    """Batches cut into micro-batches of `rows` rows each, in row order (a pipeline's view of its rows)."""
    return [
        {k: v[start : start + rows] for k, v in batch.items()}
        for batch in batches
        for start in range(0, len(batch["input_ids"]), rows)
    ]


# Which engine runs a pipeline schedule: DeepSpeed's PipelineModule holds one stage per rank, so the schedules with
# two stages per rank run on torch.distributed.pipelining; 1F1B and GPipe run on either (DeepSpeed by default).
PIPELINE_ENGINES = ("deepspeed", "torch")


def pipeline_engine(geometry: schedule.PipelineGeometry, requested: str | None) -> str:
    """The engine for `geometry`'s schedule: `requested` (--pipeline-engine) when it can run it; UsageError if not."""
    if requested == "deepspeed" and geometry.stages_per_rank != 1:
        raise UsageError(
            f"{geometry.schedule} holds {geometry.stages_per_rank} stages per rank, which DeepSpeed's engine cannot "
            "run; drop --pipeline-engine deepspeed (it runs on torch.distributed.pipelining)"
        )
    if requested is not None:
        return requested
    return "deepspeed" if geometry.stages_per_rank == 1 else "torch"
