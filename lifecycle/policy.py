"""The decision at each step boundary: save, stop, abort or roll back, the same on every rank.

What asks: the divergence guard (`--divergence-action` on a blow-up), job control (`python -m monitor control`),
stop signals, the end of a pass over the data (`--save-strategy epoch`) and the save cadence. Each rank raises at most
one wish per step; ``agree`` all-reduces them with MAX over ``ACTIONS`` (ordered by priority), so every rank takes
the same branch at the same step and no collective can deadlock. Non-finite weights are never saved: the divergence
actions act on the last finite state.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass

import torch

from console import say
from lifecycle.divergence import DivergenceDetector
from lifecycle.jobs import JobControl

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


@dataclass(frozen=True)
class Decision:
    command: str | None  # one of ACTIONS, agreed by every rank
    reason: str | None  # why the divergence guard fired (None: it did not)
    save: bool  # write a checkpoint at this step

    @property
    def stop(self) -> bool:
        return self.command in ("stop", "abort")

    @property
    def exit_code(self) -> int:
        """0 for a stop that saved; 1 for an abort (job control or the divergence guard) or any stop the guard
        caused, so `train.py && next-step` does not carry on after one."""
        return 1 if self.reason or self.command == "abort" else 0

    def abort(self) -> Decision:
        """The same step, ending without a save (a rollback that had nowhere to go)."""
        return Decision("abort", self.reason, save=False)


class Policy:
    """Turns what each step measured and what was asked into one `Decision` (see the module docstring)."""

    def __init__(self, args, plan, detector: DivergenceDetector, control: JobControl, batches, device, world: int,
                 log_event: Callable[..., None]) -> None:  # fmt: skip
        self.args, self.plan, self.detector, self.control = args, plan, detector, control
        self.device, self.world, self.log_event = device, world, log_event
        self.signals = StopSignals()
        self.epoch = batches.epoch if batches is not None else 0  # the data pass in progress
        self.pending: list[tuple] = []  # (step, loss, grad norm) since the last boundary, maybe on the device
        self.wish: str | None = None  # the strongest command or signal since the last boundary

    def decide(self, step: int, loss, grad_norm, eval_loss: float | None, batches) -> Decision:
        """`loss` and `grad_norm` may be device tensors: they are read, with every step's since the last boundary,
        only at a boundary step (logging, evaluation, a scheduled save, the last step), where the ranks agree."""
        args = self.args
        self.pending.append((step, loss, grad_norm))
        wish = self.control.poll() or ("stop" if self.signals.requested else None)
        self.wish = max(self.wish, wish, key=ACTIONS.index)  # held until the boundary (host-side: no sync)
        if args.save_strategy == "epoch" and batches is not None and batches.epoch != self.epoch:  # a pass ended
            self.epoch, self.wish = batches.epoch, self.wish or "save"
        last = step == self.plan.total_steps
        due = args.save_strategy != "no" and (
            last or (args.save_strategy == "steps" and step % self.plan.save_steps == 0)
        )
        if not (due or last or eval_loss is not None or step % self.plan.logging_steps == 0):
            return Decision(None, None, save=False)
        reason = None
        for at, loss, grad_norm in self._read_pending():  # in step order: the guard's averages are per update
            reason = reason or self.detector.update(at, loss, grad_norm)
        if eval_loss is not None:
            reason = reason or self.detector.update_eval(step, eval_loss)
        wish, self.wish = self.wish, None
        command = agree(divergence_wish(reason, args.divergence_action, wish), self.device, self.world)
        if command in ("abort", "stop", "rollback") and reason:
            self.log_event(step, "divergence", reason=reason, action=command)
            say(f"divergence at step {step:,}: {reason}; action: {command}")
        wants_save = command in ("save", "stop") or (due and command not in ("abort", "rollback"))
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and (eval_loss is None or math.isfinite(eval_loss))
        if wants_save and not finite:
            say(f"step {step:,}: not saving non-finite weights (loss {loss}, gnorm {grad_norm}, eval {eval_loss})")
        return Decision(command, reason, save=wants_save and finite)

    def _read_pending(self) -> list[tuple[int, float, float]]:
        """The buffered steps' (step, loss, grad norm) as numbers: one read of the device for all of them."""
        steps = [at for at, _, _ in self.pending]
        values = [torch.as_tensor(v, device=self.device).double() for _, *pair in self.pending for v in pair]
        read = torch.stack(values).tolist()
        self.pending = []
        return [(at, read[2 * i], read[2 * i + 1]) for i, at in enumerate(steps)]

    def close(self) -> None:
        self.control.close()
        self.signals.restore()
