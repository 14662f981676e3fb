"""Per-device memory of a training run, estimated from the model config alone (no tensor is allocated).

    estimate_memory(cfg, micro_batch=4, seq_len=4096, optimizer="adamw", param_dtype="fp32",
                    layout="ddp", world=4, stages=1)
    -> {"parameters": ..., "gradients": ..., "optimizer": ..., "activations": ..., "total": ...}   (bytes)

What each entry counts, for the most loaded device:
- parameters: the weights held, in `param_dtype` (fp32, or bf16 for Adafactor on bf16 weights).
- gradients: one gradient per weight held, in `param_dtype`.
- optimizer: AdamW keeps two moments per weight in the weights' dtype; Adafactor keeps fp32 row and column
  statistics for each matrix and a full fp32 second moment for each vector.
- activations: what autograd keeps for the backward pass of the micro-batches in flight, in the compute dtype
  (bf16 under `compute_dtype="bf16"`, else the parameter dtype), plus the chunked loss's fp32 gradient buffers.
- total: the sum.

Layouts:
- "ddp": every process holds the whole model, its gradients and optimizer state (one process is world=1).
- "fsdp": weights, gradients and optimizer state are sharded over `world` processes; each also gathers one decoder
  block's full weights and gradients at a time.
- "pipeline": `stages` stages, layers split evenly; the first stage also holds the embedding and the last the head
  (both when tied). The first stage of a 1F1B schedule keeps `stages` micro-batches in flight; pass `in_flight`
  for GPipe, which keeps all of a step's micro-batches.

The activation count follows models/model.py (pre-norm or post-norm blocks, grouped-query attention, gated MLP,
a fused attention kernel that keeps no scores; `attn_implementation="eager"` adds the T x T scores). It leaves out
the allocator's slack, temporary buffers inside kernels and communication buckets, so real peaks run somewhat
higher; it is meant to refuse sizes that cannot fit and to compare layouts, not to plan the last gigabyte.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import Transformer

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LAYOUTS = ("ddp", "fsdp", "pipeline")
OPTIMIZERS = ("adamw", "adafactor", "muon")


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable parameter, from the real module built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _optimizer_floats(shapes: list[tuple[int, ...]], optimizer: str) -> int:
    """Optimizer state elements for these parameters (Adafactor's are fp32; AdamW's take the weights' dtype)."""
    if optimizer in ("adamw", "muon"):  # NOTE: Muon's matrices keep one buffer, not two: counted as AdamW (a bound)
        return sum(2 * _numel(s) for s in shapes)
    return sum((_numel(s[:-1]) + s[-1]) if len(s) >= 2 else _numel(s) for s in shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def activation_bytes_per_token(
    cfg: ModelConfig, seq_len: int, dtype_bytes: int, attn_implementation: str, documents: bool = True
) -> int:
    """Bytes autograd keeps per token of one decoder block for its backward pass.

    Per block, in elements per token: each RMSNorm keeps its input and the normalised input (2 x hidden, twice) and
    the attention block's residual input is kept once more for the output projection's sum (2 x hidden); attention
    keeps the queries and keys after RoPE and the values (q + 2 x kv wide, q = heads x head_dim) and its output (q),
    plus one log-sum-exp per head; the gated MLP keeps gate, up, the activation and their product (4 x intermediate).
    QK-norm adds 2 x (q + kv). An eager kernel also keeps every head's attention probabilities over the sequence and
    the keys and values repeated to every query head. With `documents` (packed rows hold several documents) the
    dense-mask kernels keep a mask row per token and block: sdpa as an additive mask in the compute dtype, eager as
    booleans. These coefficients match the tensors autograd saves in
    models/model.py (tests/test_memory.py counts them with saved-tensor hooks).
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    elements = 6 * h + 2 * q + 2 * kv + 4 * i + cfg.num_attention_heads + (2 * (q + kv) if cfg.qk_norm else 0)
    if attn_implementation == "eager":
        elements += cfg.num_attention_heads * seq_len + 2 * (q - kv)
    mask = seq_len * (dtype_bytes if attn_implementation == "sdpa" else 1) if documents else 0
    return elements * dtype_bytes + (mask if attn_implementation in ("sdpa", "eager") else 0)


def _heaviest_stage(cfg: ModelConfig, shapes: dict, per_stage: int) -> list:
    """The parameter shapes of the pipeline stage holding the most: the first (embedding) or the last (head)."""
    held = [s for name, s in shapes.items() if name.startswith("layers.") and int(name.split(".")[1]) < per_stage]
    first = [*held, shapes["embed_tokens.weight"]]
    last = [*held, *(s for n, s in shapes.items() if not n.startswith(("layers.", "embed_tokens.")))]
    if cfg.tie_word_embeddings:
        last.append(shapes["embed_tokens.weight"])
    return max(first, last, key=lambda group: sum(map(_numel, group)))


def estimate_memory(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int,
    optimizer: str = "adamw",
    param_dtype: str = "fp32",
    compute_dtype: str | None = None,
    layout: str = "ddp",
    world: int = 1,
    stages: int = 1,
    in_flight: int | None = None,
    attn_implementation: str = "sdpa",
    checkpointing: bool = False,
    documents: bool = True,
) -> dict[str, int]:
    """Estimated peak bytes on the most loaded device (see the module docstring for what each entry counts).

    micro_batch: sequences per forward pass on one device (`--batch-size`; a pipeline's micro-batch size).
    seq_len: tokens per sequence (`--max-length`).
    optimizer: "adamw", "adafactor" or "muon" (its state counted as AdamW's, an upper bound).
    param_dtype: dtype of the stored weights ("fp32" or "bf16").
    compute_dtype: dtype of the activations (None: param_dtype; "bf16" under autocast over fp32 weights).
    layout: "ddp", "fsdp" or "pipeline"; world: processes (FSDP shards over them); stages: pipeline stages.
    in_flight: micro-batches whose activations a pipeline's first stage holds at once (None: `stages`, as 1F1B does
        given at least that many micro-batches; GPipe holds all of a step's micro-batches).
    checkpointing: activation checkpointing per decoder block: each block keeps only its input, and one block at a
        time recomputes its full activations during the backward pass.
    documents: rows hold several documents (packed data), so sdpa and eager attend through a dense T x T mask. (On
        CPU, sdpa instead attends one document at a time and keeps no mask but one more query-sized tensor per block:
        within a few percent of this, measured.)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len), ("world", world), ("stages", stages)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    p_bytes = DTYPE_BYTES[param_dtype]
    a_bytes = DTYPE_BYTES[compute_dtype or param_dtype]
    state_bytes = p_bytes if optimizer in ("adamw", "muon") else 4
    shapes = parameter_shapes(cfg)
    layers = cfg.num_hidden_layers
    tokens = micro_batch * seq_len
    per_layer = activation_bytes_per_token(cfg, seq_len, a_bytes, attn_implementation, documents)
    recompute = 0
    if checkpointing:  # a block's input per block, plus one block's activations while it is recomputed
        per_layer, recompute = cfg.hidden_size * a_bytes, tokens * per_layer
    # The chunked loss keeps fp32 gradients for the final hidden states and the head, plus the final norm's input.
    loss = tokens * cfg.hidden_size * (4 + a_bytes) + cfg.vocab_size * cfg.hidden_size * 4
    embed_out = tokens * cfg.hidden_size * a_bytes
    if documents and attn_implementation in ("sdpa", "eager"):
        embed_out += tokens * seq_len  # the boolean document mask, built once per forward

    if layout == "pipeline":
        per_stage = -(-layers // stages)
        heaviest = _heaviest_stage(cfg, shapes, per_stage)
        params = sum(map(_numel, heaviest))
        opt = _optimizer_floats(heaviest, optimizer)
        in_flight = in_flight or stages
        activations = in_flight * tokens * per_stage * per_layer + embed_out * in_flight + loss + recompute
    else:
        params = sum(map(_numel, shapes.values()))
        opt = _optimizer_floats(list(shapes.values()), optimizer)
        activations = tokens * layers * per_layer + embed_out + loss + recompute
    result = {
        "parameters": params * p_bytes,
        "gradients": params * p_bytes,
        "optimizer": opt * state_bytes,
        "activations": activations,
    }
    if layout == "fsdp" and world > 1:
        block = sum(_numel(s) for n, s in shapes.items() if n.startswith("layers.0."))
        for key in ("parameters", "gradients", "optimizer"):
            result[key] = -(-result[key] // world)
        result["parameters"] += block * p_bytes  # one gathered block (weights and gradients) at a time
        result["gradients"] += block * p_bytes
    result["total"] = sum(result.values())
    return result


def format_memory(estimate: dict[str, int]) -> str:
    """One line: total and its parts in GiB."""
    gib = 2**30
    parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in estimate.items() if k != "total")
    return f"{estimate['total'] / gib:.2f} GiB per device ({parts})"
