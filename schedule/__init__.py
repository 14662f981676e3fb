"""Token budget -> steps and learning rates (plan), and the InfiniteLR schedule (lr)."""

from schedule.lr import InfiniteLR, lr_at, parse_lr_spike
from schedule.plan import Plan, format_plan, make_plan

__all__ = ["InfiniteLR", "Plan", "format_plan", "lr_at", "make_plan", "parse_lr_spike"]
