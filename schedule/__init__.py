"""Token budget -> steps and learning rates (plan), the InfiniteLR schedule (lr), and the optimizers (optim)."""

from schedule.lr import InfiniteLR, lr_at
from schedule.optim import Adafactor, build_optimizer, resolve_dtype, stochastic_round_to_bf16
from schedule.plan import Plan, format_plan, make_plan

__all__ = [
    "Adafactor",
    "InfiniteLR",
    "Plan",
    "build_optimizer",
    "format_plan",
    "lr_at",
    "make_plan",
    "resolve_dtype",
    "stochastic_round_to_bf16",
]
