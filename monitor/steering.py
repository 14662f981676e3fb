"""What every rank must agree on at a step boundary: job-control commands, stop signals, the divergence guard.

Each rank raises at most one wish per step; ``agree`` all-reduces them with MAX over ``ACTIONS`` (ordered by
priority), so every rank takes the same branch at the same step and no collective can deadlock.
"""

from __future__ import annotations

import signal

import torch

# In increasing priority.
ACTIONS = (None, "save", "rollback", "stop", "abort")


class StopSignals:
    """SIGTERM/SIGINT ask for a clean stop (save at the next step boundary, then exit); a second one stops at once.

    The second signal raises `Interrupted`, which unwinds through the loop's clean-up (job registration, logs) to
    train.py's main(): one line, exit code 128 + the signal number, no traceback.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise Interrupted(signum, "a second stop signal")
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """A signal that ends the process at once; `signum` picks the exit code."""

    def __init__(self, signum: int, what: str) -> None:
        super().__init__(what)
        self.signum = signum


def interrupt_at_once(signum, frame) -> None:
    """The handler before the loop starts: nothing to save yet, so SIGTERM/SIGINT end the start-up cleanly."""
    raise Interrupted(signum, "a stop signal before training started")


def agree(wish: str | None, device: torch.device, world_size: int) -> str | None:
    """The highest-priority action any rank wished for this step."""
    code = torch.tensor([ACTIONS.index(wish)], device=device)
    if world_size > 1:
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    return ACTIONS[int(code)]


def divergence_wish(reason: str | None, action: str, fallback: str | None) -> str | None:
    """What the divergence guard asks for (``--divergence-action``), else the other wish of this step."""
    if reason is None or action == "none":
        return fallback
    return action
