"""The run's process group: joined once, before the start is checked, with the run's own timeout (--dist-timeout).

Joining first gives every launcher (Accelerate, deepspeed, torchrun) and every layout the same group, and it lets
the ranks agree on a start: a refusal that only one rank can make (rank 0 holds the output dir's lock and sees a
pending replacement; a node may lack a data file) refuses the start on every rank, with exit code 2, instead of
leaving the others waiting in a collective. Every collective of the group then fails after the timeout rather than
torch's default (30 minutes on gloo), so a node that stops answering ends the run in bounded time, and
`lost_peer` turns the error every survivor gets into one line.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from console import UsageError


def launched() -> bool:
    """True in a process a launcher started as one of several (every launcher we support sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(args: argparse.Namespace) -> None:
    """Join the launcher's process group with `args.dist_timeout` (nothing to join: one process, or a dry run)."""
    if args.dry_run or not launched() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:  # each process on its own GPU before the first collective
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = args.dist_backend or ("nccl" if cuda else "gloo")
    global _timeout_s
    _timeout_s = args.dist_timeout
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))


def leave() -> None:
    """Leave the process group, if this process is in one: a process that exits in one can abort as it ends
    (gloo's threads outlive the interpreter's teardown), which turns a clean refusal into a crash."""
    if dist.is_initialized():
        dist.destroy_process_group()


def first_refusal(refusal: Exception | None) -> Exception | None:
    """Every rank's verdict on the start, shared: the refusal of the lowest rank that refused, on every rank (one
    process alone: its own). A refusal made elsewhere is named with its rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return refusal
    verdicts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, None if refusal is None else str(refusal))
    rank, message = next(((r, v) for r, v in enumerate(verdicts) if v is not None), (None, None))
    if message is None:
        return None
    if rank == dist.get_rank():
        return refusal
    return UsageError(message if rank == 0 else f"on rank {rank}: {message}")


# What the backends raise in a collective when another process of the group is gone, or stopped answering.
_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")
_HUNG = ("Timed out waiting", "timed out after", "wait timeout", "Socket Timeout", "collective operation timeout")
_timeout_s: float | None = None  # --dist-timeout of the group this process joined


def lost_peer(error: BaseException) -> str | None:
    """Why a collective failed when another process of the run is gone or hung (None: `error` is something else):
    the short reason a survivor prints in its one line."""
    if not dist.is_initialized() or not isinstance(error, RuntimeError):  # torch's DistError is a RuntimeError
        return None
    text = str(error)
    if any(marker in text for marker in _HUNG):
        within = f"--dist-timeout, {_timeout_s:g} s" if _timeout_s else "the backend's timeout"
        return f"another process of the run stopped answering (no reply within {within})"
    gone = next((marker for marker in _GONE if marker in text), None)
    if gone is None and not isinstance(error, dist.DistError):
        return None
    return f"another process of the run is gone ({gone or type(error).__name__})"
