"""The InfiniteLR schedule: warmup, cosine cooldown, constant, and an optional final anneal.

    max_lr    |    .--------..__
              |   /               ``--..__
    const_lr  |  /                        ``-------------------------------.
    min_lr    | /                                                           `--.
              +-+---------------------------------+----------------------------+---> step
               warmup       cosine cooldown                 constant            anneal (optional)

The LR is a pure function of the step (`lr_at`); the torch wrapper (`InfiniteLR`) only counts steps. Because the
constant phase has no end, a run trained to its budget can be continued with a larger budget, or forked into annealed
variants by resuming with `--max-steps S+N --anneal-steps N`, without re-warming.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from console import UsageError


class Plan(Protocol):
    """The fields of schedule.plan.Plan that the schedule reads."""

    max_lr: float
    constant_lr: float
    min_lr: float
    warmup_steps: int
    cooldown_steps: int
    total_steps: int
    anneal_steps: int


def _cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _base_lr_at(step: int, plan: Plan) -> float:
    """Warmup -> cosine cooldown -> constant: the schedule without its anneal."""
    if plan.warmup_steps and step <= plan.warmup_steps:
        return plan.max_lr * step / plan.warmup_steps
    into_cooldown = step - plan.warmup_steps
    if into_cooldown > plan.cooldown_steps:
        return plan.constant_lr
    return _cosine(plan.max_lr, plan.constant_lr, into_cooldown / max(1, plan.cooldown_steps))


def lr_at(step: int, plan: Plan) -> float:
    """The LR for optimizer update number `step` (1-based: the first update uses step 1).

    Phases, for a plan with warmup W, cooldown C, total T and anneal A steps:
    - steps 1..W: linear warmup, max_lr * step / W (the first update gets max_lr / W, never 0);
    - steps W+1..W+C: cosine from max_lr to constant_lr, reaching constant_lr exactly at step W+C;
    - later steps: constant_lr;
    - steps T-A+1..T (when A > 0): cosine from the LR of step T-A (whatever phase that was in) down to min_lr,
      reaching min_lr exactly at step T. Steps after T stay at min_lr.
    """
    if step < 1:
        raise ValueError(f"step {step} is not an optimizer update number; updates are counted from 1")
    if plan.anneal_steps:
        anneal_start = plan.total_steps - plan.anneal_steps
        if step > anneal_start:
            progress = min(1.0, (step - anneal_start) / plan.anneal_steps)
            return _cosine(_base_lr_at(anneal_start, plan), plan.min_lr, progress)
    return _base_lr_at(step, plan)


class InfiniteLR:
    """Sets the optimizer's LR from `lr_at`; its only state is the number of updates made so far.

    Call `step()` once after every `optimizer.step()`, as with torch schedulers. On construction (and after
    `load_state_dict`) the param groups already hold the LR for the next update, so the first update uses
    `lr_at(1)`.

    Resuming with a different plan (a larger `--total-tokens`, a `--max-steps` fork with `--anneal-steps`) simply
    continues the new plan's curve from the saved step. With the default `--min-cooldown-tokens 100` the cooldown
    length does not depend on the budget below ~143B tokens, so the curve is unchanged up to the saved step and the
    LR continues without a jump. NOTE: when 70% of the budget sets the cooldown (long budgets or a small
    `--min-cooldown-tokens`), a larger budget stretches the cooldown and the LR steps up at the resume step to the
    value the stretched curve has there; it never re-warms.

    NOTE: do not pass this scheduler through `accelerator.prepare`: Accelerate's wrapper steps a scheduler once per
    process per update (it assumes per-process schedules), which would run this one world_size times too fast.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, plan: Plan, last_step: int = 0, spike: dict | None = None
    ) -> None:
        self.optimizer = optimizer
        self.plan = plan
        self.last_step = last_step  # optimizer updates made so far
        # Multiplies the scheduled LR; lowered by the divergence guard's rollback and saved by the trainer, not here.
        self.lr_factor = 1.0
        # --inject-lr-spike, a testing aid for the divergence guard: the update numbered `step` and every later one
        # run at lr_factor x factor, applied once (a rollback's new lr_factor replaces it; a resume past the step
        # never sees it).
        self.spike = dict(spike or {})
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.last_step + 1, self.plan) * self.lr_factor
        if self.spike and self.last_step + 1 == self.spike["step"]:
            lr *= self.spike["factor"]  # the spiked update; lr_factor takes the factor once it is made
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """Record one optimizer update and set the LR for the next one."""
        self.last_step += 1
        if self.spike and self.last_step == self.spike["step"]:
            self.lr_factor *= self.spike["factor"]
            self.spike = {}
        self._apply()

    @property
    def current_lr(self) -> float:
        """The LR applied to the most recent update (the one to log); before any update, the first update's LR."""
        return lr_at(max(1, self.last_step), self.plan) * self.lr_factor

    def get_last_lr(self) -> list[float]:
        """The LR now in each param group, i.e. for the next update (torch scheduler convention)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["step"])
        self._apply()

    def restore(self, step: int, lr_factor: float) -> None:
        """Continue from `step` updates with `lr_factor` (a resume, or a rollback's lowered factor)."""
        self.lr_factor = lr_factor
        self.load_state_dict({"step": step})


def parse_lr_spike(text: str | None) -> dict:
    """--inject-lr-spike STEP,FACTOR -> {"step", "factor"} ({} when not given); UsageError when malformed."""
    if not text:
        return {}
    try:
        step, factor = text.split(",")
        spike = {"step": int(step), "factor": float(factor)}
    except ValueError:
        raise UsageError(f"--inject-lr-spike {text!r} must be STEP,FACTOR, e.g. 100,50") from None
    if spike["step"] < 1 or not 0 < spike["factor"] < math.inf:
        raise UsageError(f"--inject-lr-spike {text!r} needs a STEP >= 1 and a finite FACTOR > 0, e.g. 100,50")
    return spike
