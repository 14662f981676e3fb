"""Adafactor with an absolute LR, no first moment, and bf16 stochastic rounding, as a grouped (and compilable) step.

The update, for a parameter with gradient g at step t (1-based):
    beta2_t = min(1 - t^decay_rate, beta2)               (decay_rate -0.8; 0 at t = 1, so v_1 = g^2 + eps)
    matrices (tensors of more than 2 dims as (-1, last_dim)), factored second moment:
        r = beta2_t * r + (1 - beta2_t) * mean_cols(g^2 + eps)     (one value per row)
        c = beta2_t * c + (1 - beta2_t) * mean_rows(g^2 + eps)     (one value per column)
        v = outer(r, c) / mean(r)
    vectors and scalars: v = beta2_t * v + (1 - beta2_t) * (g^2 + eps)
    u = g / sqrt(v);  u = u / max(1, rms(u) / clip_threshold)
    p = p * (1 - lr * weight_decay) - lr * u                          (decoupled weight decay)

How it runs: on a GPU, parameters of the same shape, dtype and step are updated together, stacked along a new first
dimension (`_group_update`; the deepone-162m model has 178 parameters in 6 shapes), so a step dispatches a few
hundred operations instead of several thousand; with `compiled=True` (train.py --compile) each shape's update is one
compiled graph, and the hyperparameters that change (LR, beta2_t) enter as tensors, so a new LR never recompiles.
On a CPU each parameter is updated in place, one at a time: eagerly (`_update_one`), or compiled as a group of one
that stores the new weights straight into the parameter (`_one_update_`); there stacked copies and fresh buffers
cost more than the dispatch they save. Every form computes the same update and the same rounding bits.

Statistics are fp32 whatever the parameter dtype. For bf16 parameters the new weight is computed in fp32 and rounded
to bf16: stochastically when `stochastic_rounding` (the default), else to nearest. The rounding noise is a
counter-based hash of (seed, step, parameter index, element index) (`rounding_noise`): no generator state, the same
bits in eager and compiled form, on every data-parallel rank (so replicas stay bit-identical), and after a resume
from the step alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import zeros as dtensor_zeros

# Update clipping threshold: an update whose RMS exceeds this is scaled down to it (Adafactor paper, section 6).
CLIP_THRESHOLD = 1.0

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x7FEB352D, 0x68E31DA5)  # odd and below 2^31: 32-bit products stay inside int64 (no overflow)


def hash32(x):
    """A well-mixed 32-bit hash (xorshift-multiply rounds) of non-negative ints or int64 tensors below 2^32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIERS[0]) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIERS[1]) & _MASK32
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of one parameter's rounding noise at one step."""
    return hash32(hash32(hash32(seed & _MASK32) ^ hash32(seed >> 32) ^ step) ^ index)


def rounding_noise(keys: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """int32 noise in [0, 2^16) of shape (len(keys), *shape): element e of slice i is hash32(e ^ keys[i]) >> 16."""
    numel = math.prod(shape)
    index = torch.arange(numel, dtype=torch.int64, device=keys.device)
    return (hash32(index[None] ^ keys[:, None]) >> 16).to(torch.int32).reshape(len(keys), *shape)


def stochastic_round_to_bf16(x: torch.Tensor, noise: torch.Tensor | int) -> torch.Tensor:
    """Round an fp32 tensor to bf16, up or down at random with probability proportional to closeness.

    bf16 is the top 16 bits of fp32, so the dropped low 16 bits L place x at fraction L / 2^16 of the way from its
    truncation (towards zero) to the next bf16 value away from zero. Adding a uniform integer in [0, 2^16) to the
    bit pattern carries into the kept bits with probability exactly L / 2^16, so truncating afterwards rounds away
    from zero with that probability: E[result] = x (unbiased), and the result is always one of x's two bf16
    neighbours (x itself when it is already a bf16 value). Signs are handled for free because the bits are
    sign-magnitude. NaN stays NaN; values beyond the largest bf16 may round to infinity.

    `noise`: int32 values in [0, 2^16) of x's shape, or an int key from which `rounding_noise` draws them.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 expects an fp32 tensor, got {x.dtype}")
    if not torch.is_tensor(noise):
        noise = rounding_noise(torch.tensor([noise], device=x.device), x.shape)[0]
    bits = x.view(torch.int32) + noise
    rounded = (bits & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 == 0xFFFF0000: exact conversion
    # NOTE: adding noise to a NaN's bit pattern can turn it into inf or even 0; keep NaNs visible to the loop.
    return torch.where(x != x, x.to(torch.bfloat16), rounded)  # x != x: NaN (vectorizes where isnan does not)


def _group_update(params, grads, stats, keys, hyper, factored: bool, stochastic: bool):
    """One Adafactor step of same-shaped parameters, stacked as (n, *shape); returns (new weights, new stats).

    stats: [rows (n, R), cols (n, C)] for matrices, [v (n, *shape)] otherwise. hyper: fp32 tensor of
    (lr, weight_decay, beta2_t, eps, clip_threshold). keys: (n,) int64 rounding keys.
    """
    lr, weight_decay, beta2, eps, clip = hyper.unbind()
    g = grads.float()
    n, shape = g.shape[0], g.shape[1:]
    sq = g * g + eps
    if factored:
        g2, sq2 = g.reshape(n, -1, shape[-1]), sq.reshape(n, -1, shape[-1])
        row = stats[0] * beta2 + sq2.mean(dim=2) * (1 - beta2)
        col = stats[1] * beta2 + sq2.mean(dim=1) * (1 - beta2)
        # 1 / sqrt(outer(r, c) / mean(r)) as the outer product of two rsqrt vectors.
        update = g2 * (row / row.mean(dim=1, keepdim=True)).rsqrt()[:, :, None] * col.rsqrt()[:, None, :]
        update, new_stats = update.reshape(g.shape), [row, col]
    else:
        v = stats[0] * beta2 + sq * (1 - beta2)
        update, new_stats = g * v.rsqrt(), [v]
    rms = update.reshape(n, -1).square().mean(dim=1).sqrt()
    update = update / (rms / clip).clamp(min=1.0).reshape(n, *[1] * len(shape))
    new = params.float() * (1 - lr * weight_decay) - lr * update
    if stochastic:
        new = stochastic_round_to_bf16(new, rounding_noise(keys, shape))
    return new.to(params.dtype), new_stats


def _group_update_(params, grads, stats, keys, hyper, factored: bool, stochastic: bool) -> None:
    """`_group_update` written back into `params` and `stats` in place: compiled, the new weights are stored
    straight into the parameters (or views of one parameter, as a group of one), with no new buffer to fill."""
    new, new_stats = _group_update(params, grads, stats, keys, hyper, factored, stochastic)
    params.copy_(new)
    for stat, new_stat in zip(stats, new_stats, strict=True):
        stat.copy_(new_stat)


def _one_update_(param, grad, stats, key, hyper, factored: bool, stochastic: bool) -> None:
    """`_group_update_` of one parameter as a group of one (`key`: its 0-d rounding key)."""
    _group_update_(param[None], grad[None], [s[None] for s in stats], key[None], hyper, factored, stochastic)


# Compiled update forms, and every (shape, dtype, device, rounding, form) compiled in this process.
_COMPILED_UPDATES: dict[Callable, Callable] = {}
_COMPILED_SHAPES: set[tuple] = set()


def _zeros(size: int, like: torch.Tensor, split: bool) -> torch.Tensor:
    """fp32 zeros for a statistic of `like`; for a sharded (FSDP) parameter a DTensor, split along its rows when
    `split` (per-row statistics) and replicated otherwise (per-column statistics), so the maths runs unchanged
    and the row and column means span the whole matrix."""
    if not isinstance(like, DTensor):
        return torch.zeros(size, dtype=torch.float32, device=like.device)
    placements = like.placements if split else [Replicate()] * like.device_mesh.ndim
    return dtensor_zeros(size, dtype=torch.float32, device_mesh=like.device_mesh, placements=placements)


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern, 2018); see the module docstring for the update, the grouping and the rounding.

    `compiled`: run each update as a torch.compile'd graph (one per shape). `grouped`: stack same-shaped parameters
    (None: on GPUs).
    Sharded (FSDP) parameters are updated one at a time in eager mode; each shard draws its own rounding bits (the
    same distribution as one process, not the same draws).
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
        compiled: bool = False,
        grouped: bool | None = None,
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
        self.seed = seed
        self.compiled = compiled
        self.grouped = grouped

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.dim() >= 2:
                state["row"] = _zeros(p.numel() // p.shape[-1], like=p, split=True)
                state["col"] = _zeros(p.shape[-1], like=p, split=False)
            else:
                state["sq"] = _zeros(p.numel(), like=p, split=True).reshape(p.shape)
        return state

    def _groups(self) -> dict[tuple, list[tuple[int, torch.Tensor, dict]]]:
        """(shape, dtype, device, step, param group) -> [(parameter index, parameter, state)], state steps advanced."""
        groups: dict[tuple, list] = {}
        index = 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                key = ("dtensor", index) if isinstance(p, DTensor) else (tuple(p.shape), p.dtype, p.device)
                groups.setdefault((*key, state["step"], g), []).append((index, p, state))
        return groups

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for (*_, step, g), members in self._groups().items():
            group = self.param_groups[g]
            beta2_t = min(1.0 - step ** group["decay_rate"], group["beta2"])
            values = [group["lr"], group["weight_decay"], beta2_t, group["eps"], group["clip_threshold"]]
            first = members[0][1]
            stochastic = first.dtype == torch.bfloat16 and group["stochastic_rounding"]
            keys = [rounding_key(self.seed, step, index) for index, _, _ in members]
            grouped = self.grouped if self.grouped is not None else first.device.type == "cuda"
            if isinstance(first, DTensor) or not (grouped or self.compiled):
                # one parameter at a time, in place: on a CPU, without a compiler, stacked copies cost more than the
                # dispatch they save
                for (_, p, state), key in zip(members, keys, strict=True):
                    self._update_one(p, state, values, key, stochastic)
            elif grouped:
                self._update_group(members, values, keys, stochastic)
            else:
                # compiled, one parameter at a time (a CPU): each is a group of one, updated in place through views
                update = self._compiled_update(first, stochastic, _one_update_)
                hyper = torch.tensor(values, dtype=torch.float32, device=first.device)
                names = ("row", "col") if first.dim() >= 2 else ("sq",)
                key_list = torch.tensor(keys, dtype=torch.int64, device=first.device).unbind()
                for (_, p, state), key in zip(members, key_list, strict=True):
                    update(p, p.grad, [state[k] for k in names], key, hyper, p.dim() >= 2, stochastic)
        return loss

    def _compiled_update(self, p: torch.Tensor, stochastic: bool, update: Callable) -> Callable:
        """`update` compiled (one graph per parameter shape). Dynamo keeps the graphs of a function together and
        stops compiling (runs eagerly) past its recompile limit of 8: a model may have more shapes, so the limit is
        raised to the shapes seen in this process while its updates run."""
        _COMPILED_SHAPES.add((tuple(p.shape), p.dtype, p.device, stochastic, update))
        if update not in _COMPILED_UPDATES:
            _COMPILED_UPDATES[update] = torch.compile(update, dynamic=False)
        compiled, limit = _COMPILED_UPDATES[update], max(8, 2 * len(_COMPILED_SHAPES))

        def run(*args):
            with torch._dynamo.config.patch(recompile_limit=limit):
                return compiled(*args)

        return run

    def _update_group(self, members: list, values: list[float], keys: list[int], stochastic: bool) -> None:
        """Same-shaped parameters stacked (`_group_update`, compiled or not), written back in place."""
        params, states = [p for _, p, _ in members], [state for _, _, state in members]
        device, factored = params[0].device, params[0].dim() >= 2
        names = ("row", "col") if factored else ("sq",)
        update = self._compiled_update(params[0], stochastic, _group_update) if self.compiled else _group_update
        new, new_stats = update(
            torch.stack(params),
            torch.stack([p.grad for p in params]),
            [torch.stack([state[k] for state in states]) for k in names],
            torch.tensor(keys, dtype=torch.int64, device=device),
            torch.tensor(values, dtype=torch.float32, device=device),
            factored,
            stochastic,
        )
        torch._foreach_copy_(params, list(new.unbind(0)))
        for k, stacked in zip(names, new_stats, strict=True):
            torch._foreach_copy_([state[k] for state in states], list(stacked.unbind(0)))

    def _update_one(self, p: torch.Tensor, state: dict, values: list[float], key: int, stochastic: bool) -> None:
        """One parameter, eagerly and in place; a sharded (FSDP) one as DTensors (statistics span the whole
        matrix), rounded on its local shard with bits of its own."""
        lr, weight_decay, beta2_t, eps, clip = values
        grad = p.grad.float()
        grad_sq = grad.square().add_(eps)
        if grad.dim() >= 2:
            grad_2d, grad_sq = grad.reshape(-1, grad.shape[-1]), grad_sq.reshape(-1, grad.shape[-1])
            row, col = state["row"], state["col"]
            row.mul_(beta2_t).add_(grad_sq.mean(dim=1), alpha=1.0 - beta2_t)
            col.mul_(beta2_t).add_(grad_sq.mean(dim=0), alpha=1.0 - beta2_t)
            update = grad_2d * (row / row.mean()).rsqrt_().unsqueeze(1) * col.rsqrt().unsqueeze(0)
            update = update.reshape(grad.shape)
        else:
            state["sq"].mul_(beta2_t).add_(grad_sq, alpha=1.0 - beta2_t)
            update = grad * state["sq"].rsqrt()
        update.div_((update.square().mean().sqrt() / clip).clamp_(min=1.0))  # a tensor divisor: no host sync
        if p.dtype == torch.float32 and not isinstance(p, DTensor):
            p.mul_(1.0 - lr * weight_decay).add_(update, alpha=-lr)
            return
        new = p.float().mul_(1.0 - lr * weight_decay).add_(update, alpha=-lr)
        target = p.to_local() if isinstance(p, DTensor) else p
        new = new.to_local() if isinstance(new, DTensor) else new
        if stochastic:
            if isinstance(p, DTensor):
                key ^= hash32(p.device_mesh.get_local_rank() + 1)
            new = stochastic_round_to_bf16(new, key)
        target.copy_(new)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        state_dict.pop("sr_generator", None)  # checkpoints of the generator-based rounding: the step is enough now
        super().load_state_dict(state_dict)
        # NOTE: torch.optim casts every floating-point state tensor to its parameter's dtype on load, which would
        # turn the fp32 statistics of bf16 weights into bf16. Copy them again from the saved fp32 tensors.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
