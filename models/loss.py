"""Cross-entropy over the output head without materialising (tokens, vocab) logits in fp32 at once.

The naive loss computes `logits = hidden @ W^T` for every token (B*T x V floats: 2 GiB for 16k tokens and a 32k
vocabulary), then a log-softmax of the same size, and keeps both for backward. Here tokens go through the head in
chunks; each chunk's logits live only inside the loop. Because the loss is the last op of the graph, the gradient
of each chunk is known in closed form the moment its logits exist (softmax - one_hot) / num_labels, so the forward
pass also computes d(loss)/d(hidden) and d(loss)/d(W) chunk by chunk and backward only scales them by the incoming
gradient. That costs the same three matmuls as the naive loss (no recomputation) and keeps one chunk of logits alive.
Without grad mode (evaluation) only the loss is computed.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: one chunk of logits about as large as the hidden states, but never tiny matmuls."""
    return max(1024, (num_tokens * hidden_size) // vocab_size)


def memory_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int, budget: int, logit_bytes: int = 2) -> int:
    """Tokens per chunk when `budget` bytes of device memory are free for the loss: as few chunks as fit (one when
    every token's logits do), never smaller than `default_chunk_size`. A chunk's token holds its V logits and their
    gradient in the compute dtype (`logit_bytes`) and their fp32 log-softmax."""
    fit = budget // (vocab_size * (2 * logit_bytes + 4))
    return int(min(num_tokens, max(default_chunk_size(num_tokens, hidden_size, vocab_size), fit)))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor):
    """One chunk's elementwise tail: logits (n, V), labels (n,) -> (summed nats of the labelled positions,
    d(loss)/d(logits) in the logits' dtype).

    d(loss)/d(logits) = (softmax - one_hot) / normalizer on labelled positions, 0 elsewhere. Eagerly this is a few
    passes over the chunk; under `--compile` (Transformer.compile_loss_path), fused with the head.
    """
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)[:, None]
    logp = torch.log_softmax(logits.float(), dim=-1)  # one fused pass
    nll = -torch.where(valid, logp.gather(1, target).squeeze(1), 0.0).sum()
    grad = logp.exp_()  # softmax, in place
    grad.scatter_add_(1, target, torch.full(target.shape, -1.0, device=target.device))
    grad.mul_((valid.float() / normalizer)[:, None])
    return nll, grad.to(logits.dtype)


# bf16 x bf16 -> fp32 GEMMs (CUDA): the head's gradient summed in fp32 inside the GEMM, not rounded to bf16 first.
_FP32_OUT = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


def _fp32_gemm(a: torch.Tensor) -> bool:
    """Whether a product of `a` (bf16, on CUDA, eager) can come out of the GEMM in fp32."""
    return _FP32_OUT and a.is_cuda and a.dtype == torch.bfloat16 and not torch.compiler.is_compiling()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32: an fp32-output GEMM where `_fp32_gemm`, else the product converted."""
    return torch.mm(a, b, out_dtype=torch.float32) if _fp32_gemm(a) else (a @ b).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden_t @ W^T, label_t) / normalizer, with gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, chunk_size):
        # hidden (N, C), weight (V, C), labels (N,), normalizer: 0-dim float tensor
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None  # (V, C) fp32 accumulator, created by the first chunk
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in _chunks(hidden.shape[0], chunk_size):
            h = hidden[start:end]
            # (n, V): the only full-vocabulary tensor, one chunk at a time
            nll, grad_logits = _loss_and_grad(h @ weight.t(), labels[start:end], normalizer)
            total += nll
            grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is None:
                grad_weight = _mm_fp32(grad_logits.t(), h)
            elif grad_weight.dtype == grad_logits.dtype:
                grad_weight.addmm_(grad_logits.t(), h)  # accumulate in place, no (V, C) temporary
            elif _fp32_gemm(h):
                grad_weight = torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=torch.float32)
            else:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # NOTE: not scaled in place, although that would save a (V, C) buffer: the zero-bubble pipeline schedules
        # split backward into an input pass and a weight pass that each run this function on the retained graph.
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight^T` against `labels` over positions with labels != -100.

    Args:
        hidden: (..., C) final hidden states (after the last norm).
        weight: (V, C) output head.
        labels: (...) target token ids, already shifted; -100 = no target.
        num_items: divide the summed loss by this instead of the local number of labels (token-weighted averaging
            across gradient-accumulation micro-batches or ranks). Default: the local count (at least 1).
        chunk_size: tokens per chunk; default from default_chunk_size.
        reduction: "mean" (the loss above) or "none": every position's -log p of its label, shaped like `labels`, 0
            where there is none (evaluation only: no gradient flows through it).
    Returns:
        scalar float32 loss, or float32 nats shaped like `labels`.
    """
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    labels = labels.reshape(-1)  # (N,)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Run the head in the autocast dtype explicitly; the chunk loop itself runs with autocast off.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if num_items is None:
        normalizer = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        normalizer = torch.as_tensor(num_items, dtype=torch.float32, device=hidden.device)
    size = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        if reduction == "none":
            with torch.no_grad():
                nats = torch.cat(
                    [
                        torch.nn.functional.cross_entropy(
                            (hidden[start:end] @ weight.t()).float(),
                            labels[start:end],
                            ignore_index=IGNORE_INDEX,
                            reduction="none",
                        )
                        for start, end in _chunks(hidden.shape[0], size)
                    ]
                )
            return nats.reshape(shape)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, labels, normalizer, size)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in _chunks(hidden.shape[0], size):
            logits = (hidden[start:end] @ weight.t()).float()
            total += torch.nn.functional.cross_entropy(
                logits, labels[start:end], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return total / normalizer
