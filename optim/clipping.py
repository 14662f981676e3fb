"""The global gradient norm and clipping: one rule for every layout, accurate on every device.

    norm = sqrt(sum of the squares of every gradient element)     (fp32; a sharded or staged model: summed over ranks)
    each gradient *= min(1, max_norm / (norm + 1e-6))              (torch.nn.utils.clip_grad_norm_'s rule)

Why not torch.nn.utils.clip_grad_norm_: on a CPU, torch's fp32 `vector_norm` (which it uses) accumulates a large
tensor's squares without pairwise summation. On the 49,152 x 128 tied embedding of the tiny model it is off by
5.5e-5 relative (1e-3 on a random tensor of that size), so one process and a pipeline, which sum different tensors,
disagree on the norm and then on the clipped update. `Tensor.sum` sums pairwise: 5e-8. On CUDA `vector_norm`
reduces as a tree and is as accurate, so there the fused per-tensor norms are used.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def square_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the squares of every element of `grads` (plain tensors, all on one device), as an fp32 0-d tensor."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    if grads[0].device.type == "cuda":
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
    return torch.stack([g.detach().float().square().sum() for g in grads]).sum()


def global_norm(grads: list[torch.Tensor], group: dist.ProcessGroup | None = None, device=None) -> torch.Tensor:
    """The norm of `grads` taken together; with `group`, of the gradients of every rank in it (each rank passes the
    elements it alone counts: its shard, its stage's parameters). fp32 0-d tensor on `device` (default: the
    gradients')."""
    squares = square_sum(grads)
    if device is not None:
        squares = squares.to(device)
    if group is not None:
        dist.all_reduce(squares, group=group)
    return squares.sqrt()


def clip_(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale `grads` in place so that their global `norm` becomes at most `max_norm` (0 or inf: no clipping); no
    host read."""
    if not grads or max_norm <= 0 or math.isinf(max_norm):
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        torch._foreach_mul_(same, coef.to(device=same[0].device, dtype=dtype))
