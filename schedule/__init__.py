"""Token budget -> steps and learning rates (plan), the InfiniteLR schedule (lr), and the optimizers (optim)."""

from schedule.lr import InfiniteLR, lr_at
from schedule.optim import Adafactor, MuonAdamW, build_optimizer, resolve_dtype, stochastic_round_to_bf16
from schedule.plan import (
    PIPELINE_SCHEDULES,
    PipelineGeometry,
    Plan,
    format_pipeline,
    format_plan,
    make_plan,
    pipeline_geometry,
)

__all__ = [
    "PIPELINE_SCHEDULES",
    "Adafactor",
    "PipelineGeometry",
    "InfiniteLR",
    "MuonAdamW",
    "Plan",
    "build_optimizer",
    "format_pipeline",
    "format_plan",
    "lr_at",
    "make_plan",
    "pipeline_geometry",
    "resolve_dtype",
    "stochastic_round_to_bf16",
]
