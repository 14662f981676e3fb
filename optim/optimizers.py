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
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import zeros as dtensor_zeros

# Update clipping threshold: an update whose RMS exceeds this is scaled down to it (Adafactor paper, section 6).
CLIP_THRESHOLD = 1.0


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round an fp32 tensor to bf16, up or down at random with probability proportional to closeness.

    bf16 is the top 16 bits of fp32, so the dropped low 16 bits L place x at fraction L / 2^16 of the way from its
    truncation (towards zero) to the next bf16 value away from zero. Adding a uniform integer in [0, 2^16) to the
    bit pattern carries into the kept bits with probability exactly L / 2^16, so truncating afterwards rounds away
    from zero with that probability: E[result] = x (unbiased), and the result is always one of x's two bf16
    neighbours (x itself when it is already a bf16 value). Signs are handled for free because the bits are
    sign-magnitude. NaN stays NaN; values beyond the largest bf16 may round to infinity.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 expects an fp32 tensor, got {x.dtype}")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.view(torch.int32) + noise
    rounded = (bits & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 == 0xFFFF0000: exact conversion
    # NOTE: adding noise to a NaN's bit pattern can turn it into inf or even 0; keep NaNs visible to the loop.
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def _zeros(size: int, like: torch.Tensor, split: bool) -> torch.Tensor:
    """fp32 zeros for a statistic of `like`; for a sharded (FSDP) parameter a DTensor, split along its rows when
    `split` (per-row statistics) and replicated otherwise (per-column statistics), so the maths below runs unchanged
    and the row and column means span the whole matrix."""
    if not isinstance(like, DTensor):
        return torch.zeros(size, dtype=torch.float32, device=like.device)
    placements = like.placements if split else [Replicate()] * like.device_mesh.ndim
    return dtensor_zeros(size, dtype=torch.float32, device_mesh=like.device_mesh, placements=placements)


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern, 2018) with an absolute LR, no first moment, and bf16 stochastic rounding.

    For each parameter with gradient g at step t (1-based):
        beta2_t = min(1 - t^decay_rate, beta2)               (decay_rate -0.8; 0 at t = 1, so v_1 = g^2 + eps)
        matrices (tensors of more than 2 dims as (-1, last_dim)), factored second moment:
            r = beta2_t * r + (1 - beta2_t) * mean_cols(g^2 + eps)     (one value per row)
            c = beta2_t * c + (1 - beta2_t) * mean_rows(g^2 + eps)     (one value per column)
            v = outer(r, c) / mean(r)
        vectors and scalars: v = beta2_t * v + (1 - beta2_t) * (g^2 + eps)
        u = g / sqrt(v);  u = u / max(1, rms(u) / clip_threshold)
        p = p * (1 - lr * weight_decay) - lr * u                          (decoupled weight decay)

    Statistics are fp32 whatever the parameter dtype. For bf16 parameters the new weight is computed in fp32 and
    rounded to bf16: stochastically when `stochastic_rounding` (the default), else to nearest. The random bits come
    from a dedicated generator seeded with `seed`, advanced only by this optimizer and in parameter order, so every
    data-parallel rank (same seed, same parameters, identical GPUs) makes identical rounding decisions and the
    replicas stay bit-identical. Its state is part of `state_dict()` ("sr_generator", a uint8 tensor).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        *,
        weight_decay: float = 0.01,
        decay_rate: float = -0.8,
        beta2: float = 0.999,
        eps: float = 1e-30,
        clip_threshold: float = CLIP_THRESHOLD,
        stochastic_rounding: bool = True,
        seed: int = 0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Adafactor lr {lr} must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"Adafactor weight_decay {weight_decay} must be >= 0")
        if not decay_rate < 0.0:
            raise ValueError(f"Adafactor decay_rate {decay_rate} must be negative (the default is -0.8)")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Adafactor beta2 {beta2} must be in [0, 1)")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            decay_rate=decay_rate,
            beta2=beta2,
            eps=eps,
            clip_threshold=clip_threshold,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)
        self._sr_generator = torch.Generator().manual_seed(seed)
        # Per-device generators that produce the rounding bits; each use is reseeded from _sr_generator, so only
        # _sr_generator carries state and a checkpoint restores it on any device (cuda:0 on one rank, cuda:1 on
        # the next).
        self._device_generators: dict[torch.device, torch.Generator] = {}

    def _rounding_generator(self, device: torch.device, offset: int = 0) -> torch.Generator:
        seed = int(torch.randint(0, 1 << 62, (1,), generator=self._sr_generator)) + offset
        if device not in self._device_generators:
            self._device_generators[device] = torch.Generator(device=device)
        return self._device_generators[device].manual_seed(seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                grad = p.grad.float()
                factored = grad.dim() >= 2
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if factored:
                        rows = grad.numel() // grad.shape[-1]
                        state["row"] = _zeros(rows, like=p, split=True)
                        state["col"] = _zeros(grad.shape[-1], like=p, split=False)
                    else:
                        state["sq"] = torch.zeros_like(grad, dtype=torch.float32)
                state["step"] += 1
                beta2_t = min(1.0 - state["step"] ** group["decay_rate"], group["beta2"])

                grad_sq = grad.square().add_(eps)
                if factored:
                    grad_2d = grad.reshape(-1, grad.shape[-1])  # (rows, last_dim)
                    grad_sq = grad_sq.reshape(grad_2d.shape)
                    row, col = state["row"], state["col"]
                    row.mul_(beta2_t).add_(grad_sq.mean(dim=1), alpha=1.0 - beta2_t)
                    col.mul_(beta2_t).add_(grad_sq.mean(dim=0), alpha=1.0 - beta2_t)
                    # 1 / sqrt(outer(r, c) / mean(r)) as the outer product of two rsqrt vectors.
                    update = grad_2d * (row / row.mean()).rsqrt_().unsqueeze(1) * col.rsqrt().unsqueeze(0)
                    update = update.reshape(grad.shape)
                else:
                    sq = state["sq"]
                    sq.mul_(beta2_t).add_(grad_sq, alpha=1.0 - beta2_t)
                    update = grad * sq.rsqrt()
                # A tensor divisor keeps this free of host-device syncs.
                update.div_((update.square().mean().sqrt() / group["clip_threshold"]).clamp_(min=1.0))

                if p.dtype in (torch.float32, torch.float64):
                    if weight_decay:
                        p.mul_(1.0 - lr * weight_decay)
                    p.add_(update.to(p.dtype), alpha=-lr)
                    continue
                # Low-precision weights: the whole step in fp32, then one rounding.
                new = p.float()
                if weight_decay:
                    new.mul_(1.0 - lr * weight_decay)
                new.add_(update, alpha=-lr)
                if p.dtype == torch.bfloat16 and group["stochastic_rounding"] and isinstance(p, DTensor):
                    # A shard draws its own bits: the same distribution as one process, not the same draws.
                    generator = self._rounding_generator(p.device, offset=p.device_mesh.get_local_rank())
                    p.to_local().copy_(stochastic_round_to_bf16(new.to_local(), generator))
                elif p.dtype == torch.bfloat16 and group["stochastic_rounding"]:
                    p.copy_(stochastic_round_to_bf16(new, self._rounding_generator(p.device)))
                else:
                    p.copy_(new)  # round to nearest
        return loss

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["sr_generator"] = self._sr_generator.get_state()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("sr_generator", None)
        super().load_state_dict(state_dict)
        # NOTE: torch.optim casts every floating-point state tensor to its parameter's dtype on load, which would
        # turn the fp32 statistics of bf16 weights into bf16. Copy them again from the saved fp32 tensors.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        if generator_state is not None:  # NOTE: Accelerate moves the whole state dict to the GPU; the RNG state is CPU
            self._sr_generator.set_state(generator_state.to("cpu", torch.uint8))


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
) -> torch.optim.Optimizer:
    """Build "adafactor", "adamw" or "muon" over `model`'s trainable parameters (groups from `param_groups`).

    `lr` is the initial LR; the InfiniteLR scheduler overwrites it before the first update. AdamW uses betas
    (0.9, 0.95), eps 1e-8, and the fused kernel when `fused` is None and every parameter is on CUDA.
    "muon" is `MuonAdamW`: the hidden matrices (`is_muon_parameter`) in one Muon group with `weight_decay`, the
    rest in AdamW's two groups as above. `seed` and `stochastic_rounding` only concern Adafactor with bf16 weights.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters; check requires_grad before building the optimizer")
    if fused is None:
        fused = all(p.is_cuda for group in groups for p in group["params"])
    if name == "adafactor":
        return Adafactor(groups, lr, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding, seed=seed)
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
