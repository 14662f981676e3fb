"""The optimizers: Adafactor with bf16 stochastic rounding (the default), AdamW, Muon; the training dtype choice;
optimizer state by parameter name (so any layout loads any other's)."""

from optim.adafactor import Adafactor, stochastic_round_to_bf16
from optim.optimizers import (
    MuonAdamW,
    build_optimizer,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    resolve_dtype,
)

__all__ = [
    "Adafactor",
    "MuonAdamW",
    "build_optimizer",
    "load_optimizer_state_by_name",
    "optimizer_state_by_name",
    "resolve_dtype",
    "stochastic_round_to_bf16",
]
