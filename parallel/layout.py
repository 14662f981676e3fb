"""The contract between train.py's loop and a layout, the resolved run every layout builds from, and the process
set-up the four layouts share."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

import data
import models
import schedule
from lifecycle.outdir import OutputDirLock
from optim import resolve_dtype

from .geometry import PipelineGeometry


@dataclass
class Run:
    """Everything main() resolves before training, from the arguments alone; read-only afterwards."""

    args: argparse.Namespace
    plan: schedule.Plan
    pipeline: PipelineGeometry | None  # None: data parallel
    model_cfg: models.ModelConfig
    mix: data.Mix | None  # None under --dry-run (no data is touched)
    tokenizer: str | None  # --tokenizer, or the --init-from model's own
    output_dir: Path
    resume_from: Path | None
    world_size: int
    memory: dict[str, int]  # models.memory.estimate_memory for this layout, bytes per device
    lock: OutputDirLock | None = None  # held by the main process for the run's life
    resume_changes: list[str] = field(default_factory=list)  # settings changed since the checkpoint resumed


@dataclass(frozen=True)
class Process:
    """Where this process stands in the run and what it computes in."""

    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # the training dtype (--dtype resolved for the device)
    pure_bf16: bool  # Adafactor on bf16 weights; otherwise bf16 is autocast over fp32 weights

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.pure_bf16 else torch.float32

    @property
    def autocast(self) -> bool:
        """Mixed precision: bf16 autocast over fp32 weights (AdamW and Muon on bf16)."""
        return self.dtype == torch.bfloat16 and not self.pure_bf16


class Layout(Protocol):
    """What train.py's loop asks of a layout (DataParallel, FullyShardedDataParallel, Pipeline, TorchPipeline)."""

    process: Process
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    optimizer: torch.optim.Optimizer
    place: Callable | None  # how a sharded layout receives a sharded checkpoint (lifecycle.checkpoint.load_checkpoint)

    def barrier(self) -> None: ...

    def start_data(self, data_state: dict | None) -> Iterator[dict] | None:
        """The training batches this rank reads (None: it reads none), resumed at `data_state` when given."""

    def train_step(self, meter) -> tuple[float, float]:
        """One optimizer step: (global loss, pre-clip global grad norm)."""

    def evaluate(self) -> dict[str, float]:
        """loss and bits_per_byte over the held-out set, the same on every rank."""

    def checkpoint_parts(self) -> tuple[dict | None, dict | None]:
        """This rank's share of a checkpoint by Transformer parameter name: (weights, optimizer state)."""

    def load(self, model_state: dict, optimizer_state: dict) -> None: ...

    def gather_model(self) -> models.Transformer | None:
        """The whole model on the main rank (None elsewhere)."""

    def sample_model(self) -> torch.nn.Module | None:
        """The model this rank runs to sample text (None: it takes no part)."""

    def close(self) -> None: ...


def start_process(args: argparse.Namespace, join: Callable[[str], Any] | None = None, **known) -> Process:
    """Join the process group with `join(backend)` (no `join`: a library such as Accelerate joined it) and set up
    the device. train.py has usually joined already (parallel/group.py): `join` then only adopts the group.

    `known` gives rank, world and device where the library that joined tells them (Accelerate).
    """
    cpu = not torch.cuda.is_available()
    # NOTE: a pipeline's backward runs a c10d broadcast that has no autograd kernel, and torch warns on every rank
    # that this "may lead to silently incorrect behavior". It does not here: every schedule and both engines match
    # one process's losses and gradient norms (tests/test_pipeline_schedules.py, tests/test_distributed.py).
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    if join is not None:
        join(args.dist_backend or ("gloo" if cpu else "nccl"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        known = {
            "rank": torch.distributed.get_rank(),
            "world": torch.distributed.get_world_size(),
            "device": torch.device("cpu") if cpu else torch.device("cuda", local),
        }
    if not cpu:
        if known["device"].index is not None:  # Accelerate's one-process device is plain "cuda", already current
            torch.cuda.set_device(known["device"])
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype, pure_bf16 = precision(args, known["device"].type)
    return Process(known["rank"], known["world"], known["device"], dtype, pure_bf16)


def precision(args: argparse.Namespace, device_type: str) -> tuple[torch.dtype, bool]:
    """(training dtype, pure bf16): Adafactor on bf16 keeps bf16 weights; AdamW on bf16 is bf16 autocast."""
    dtype = resolve_dtype(args.dtype, device_type)
    return dtype, dtype == torch.bfloat16 and args.optimizer == "adafactor"
