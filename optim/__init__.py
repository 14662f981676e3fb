"""The optimizers: Adafactor with bf16 stochastic rounding (the default), AdamW, Muon; the training dtype choice;
optimizer state by parameter name (so any layout loads any other's)."""

from optim.optimizers import (
    Adafactor,
    MuonAdamW,
    build_optimizer,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    resolve_dtype,
    stochastic_round_to_bf16,
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
