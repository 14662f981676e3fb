"""Optimizers: Adafactor with bf16 stochastic rounding (the default), AdamW, and Muon; the training dtype choice.

How train.py combines them (`--optimizer`, `--dtype`, resolved by `resolve_dtype`):
- adafactor + bf16: pure bf16 training. The model's weights are bf16; Adafactor keeps its statistics in fp32,
  computes each update in fp32 and rounds the new weights back to bf16 stochastically, so updates far smaller than
  a bf16 ulp still move the weights in expectation. No fp32 copy of the weights exists.
- adamw or muon + bf16: mixed precision. fp32 master weights, bf16 autocast for the forward/backward pass.
- any + fp32: everything in fp32 (the CPU default).

Muon (`MuonAdamW`) is torch.optim.Muon on the decoder blocks' projection matrices and AdamW on everything else
(embeddings, an untied head, norm gains). One LR drives both: Muon scales each matrix's step by
0.2 * sqrt(max(rows, cols)) ("match_rms_adamw"), which gives its orthogonalised update the RMS of a typical AdamW
update, so `--learning-rate`, the sqrt(global batch) scaling, the InfiniteLR schedule and `--weight-decay` apply to
both groups unchanged.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.tensor
from torch import nn

from optim.adafactor import Adafactor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on matrices (>= 2 dims: linear layers, embeddings, head), none on vectors.

    Vectors are norm gains and biases: decaying them pulls norms towards zero output and biases towards zero for
    no regularisation benefit (as in nanoGPT). Tied weights appear once (`parameters()` de-duplicates them).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


# Leaf modules whose 2-D weights Muon updates: the attention and feed-forward projections of every decoder block.
MUON_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_muon_parameter(name: str, p: torch.Tensor) -> bool:
    """True for a hidden weight matrix (`...self_attn.q_proj.weight`, `...mlp.down_proj.weight`, ...).

    Names work the same in the Transformer and in a pipeline stage (`3.self_attn.q_proj.weight`). Embeddings, the
    head (tied or not), norm gains and biases are not hidden matrices: they stay with AdamW.
    """
    parts = name.split(".")
    return p.dim() == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in MUON_MATRICES


def _is_sharded(p: torch.Tensor) -> bool:
    return torch.distributed.is_available() and isinstance(p, torch.distributed.tensor.DTensor)


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the hidden matrices and torch.optim.AdamW on the rest, as one optimizer.

    Both inner optimizers work on this optimizer's own param group dicts and per-parameter state, so the LR set by
    the scheduler on `param_groups`, `state_dict()`, `load_state_dict()` (and the by-name checkpoint helpers),
    Accelerate's and DeepSpeed's wrappers all see one ordinary optimizer: Muon groups first, then AdamW groups.
    Groups carry `"muon": True/False`. Newton-Schulz runs on each whole local matrix, which every rank holds under
    one process, DDP and the pipeline; sharded parameters (FSDP's DTensors) are refused.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], lr: float, *, fused: bool = False):
        for group in muon_groups + adamw_groups:
            for p in group["params"]:
                if _is_sharded(p):
                    raise ValueError(
                        "--optimizer muon needs whole weight matrices on each rank and cannot run on FSDP-sharded "
                        "parameters; use DDP or --pipeline, or another --optimizer"
                    )
        self._muon = torch.optim.Muon(
            [dict(g, muon=True) for g in muon_groups],
            lr=lr,
            momentum=0.95,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        self._adamw = torch.optim.AdamW(
            [dict(g, muon=False) for g in adamw_groups], lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused
        )
        super().__init__([{"params": g["params"]} for g in self._muon.param_groups + self._adamw.param_groups], {})
        self._link(self._muon.param_groups + self._adamw.param_groups)

    def _link(self, groups: list[dict]) -> None:
        """Make the inner optimizers use `groups` (Muon's first) and this optimizer's state."""
        n = len(self._muon.param_groups)
        self.param_groups = groups
        self._muon.param_groups, self._adamw.param_groups = groups[:n], groups[n:]
        self._muon.state = self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces param_groups and state with new objects
        self._link(self.param_groups)


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.01,
    seed: int = 0,
    stochastic_rounding: bool = True,
    fused: bool | None = None,
    compiled: bool = False,
) -> torch.optim.Optimizer:
    """Build "adafactor", "adamw" or "muon" over `model`'s trainable parameters (groups from `param_groups`).

    `lr` is the initial LR; the InfiniteLR scheduler overwrites it before the first update. AdamW uses betas
    (0.9, 0.95), eps 1e-8, and the fused kernel when `fused` is None and every parameter is on CUDA.
    "muon" is `MuonAdamW`: the hidden matrices (`is_muon_parameter`) in one Muon group with `weight_decay`, the
    rest in AdamW's two groups as above. `seed` and `stochastic_rounding` only concern Adafactor with bf16 weights;
    `compiled` runs Adafactor's grouped step compiled.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters; check requires_grad before building the optimizer")
    if fused is None:
        fused = all(p.is_cuda for group in groups for p in group["params"])
    if name == "adafactor":
        return Adafactor(
            groups, lr, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding, seed=seed, compiled=compiled
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=fused)
    if name == "muon":
        hidden = {p for n, p in model.named_parameters() if p.requires_grad and is_muon_parameter(n, p)}
        if not hidden:
            raise ValueError("--optimizer muon found no attention or feed-forward matrices in the model")
        muon = [{"params": [p for p in groups[0]["params"] if p in hidden], "weight_decay": weight_decay}]
        rest = [dict(g, params=[p for p in g["params"] if p not in hidden]) for g in groups]
        return MuonAdamW(muon, [g for g in rest if g["params"]], lr, fused=fused)
    raise ValueError(f"--optimizer {name!r} is not known; choose adafactor, adamw or muon")


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """The training dtype for `--dtype`: "auto" is bf16 on CUDA GPUs that support it and fp32 elsewhere (CPU).

    The result decides the weights' dtype with Adafactor (pure bf16 + stochastic rounding) and the autocast dtype
    with AdamW (fp32 master weights); see this module's docstring.
    """
    device = torch.device(device)
    if dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    raise ValueError(f"--dtype {dtype!r} is not known; choose auto, bf16 or fp32")


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict:
    """``optimizer.state_dict()`` with parameters named instead of numbered, so any layout can load it.

    Returns ``{"state": name -> per-parameter state, "extra": other top-level entries (e.g. Adafactor's rounding
    generator)}``. ``names`` maps each parameter to its Transformer name (one process, DDP or a pipeline stage).
    """
    saved = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    id_to_name = {i: names[p] for i, p in zip(ids, params, strict=True)}
    extra = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    return {"state": {id_to_name[i]: s for i, s in saved["state"].items()}, "extra": extra}


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, saved: dict, names: dict[torch.nn.Parameter, str]
) -> None:
    """Inverse of `optimizer_state_by_name` for this optimizer's parameters (a pipeline stage takes its own).

    The param groups (weight decay; the LR, which the schedule sets) stay as built; only per-parameter state and
    the extra entries are loaded. ValueError when a parameter that has state here has none in ``saved``.
    """
    own = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in own["param_groups"] for i in group["params"]]
    state, missing = {}, []
    for i, p in zip(ids, params, strict=True):
        if names[p] in saved["state"]:
            state[i] = saved["state"][names[p]]
        elif saved["state"]:
            missing.append(names[p])
    if missing:
        raise ValueError(f"the checkpoint has no optimizer state for {', '.join(missing[:3])}; was it another model?")
    optimizer.load_state_dict({**saved.get("extra", {}), "state": state, "param_groups": own["param_groups"]})
