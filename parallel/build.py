"""What every layout builds from the run: the seeded model, the optimizer, the data streams and the batches."""

from __future__ import annotations

import numpy as np
import torch

import data
import models
import optim
from console import bad_input, say
from lifecycle import checks


def build_model(run, dtype: torch.dtype) -> models.Transformer:
    """The same initial weights on every rank and in every layout: seeded, built on the CPU."""
    torch.manual_seed(run.args.seed)
    if run.args.init_from:
        model, _ = models.load_hf(run.args.init_from, run.args.attn_implementation)
    else:
        model = models.Transformer(run.model_cfg, attn_implementation=run.args.attn_implementation)
        model.init_weights()
    for block in model.layers:
        block.activation_checkpointing = run.args.activation_checkpointing
    if run.args.activation_checkpointing:
        say("activation checkpointing: each block's activations are recomputed in the backward pass")
    if torch.cuda.is_available():  # few large chunks of the loss head where the GPU has room (CPU: the default)
        size_loss_chunks(model, run)
    return model.to(dtype=dtype)


def size_loss_chunks(model: models.Transformer, run) -> None:
    """The loss head's chunk from the GPU memory the run's estimate leaves: half of what remains under 80% of the
    device, so one chunk holds every token of a micro-batch when it fits (fewer passes, no re-accumulation of the
    head's fp32 gradient); never below the default size."""
    total, _ = checks.available_memory("cuda")
    budget = max(0, int(0.8 * total) - run.memory["total"]) // 2
    cfg, tokens = run.model_cfg, run.args.batch_size * run.args.max_length
    logit_bytes = 2 if checks.planned_dtype(run.args) == "bf16" else 4
    model.loss_chunk_size = models.memory_chunk_size(tokens, cfg.hidden_size, cfg.vocab_size, budget, logit_bytes)
    chunks = -(-tokens // model.loss_chunk_size)
    say(f"loss head: {chunks} chunk(s) of up to {model.loss_chunk_size:,} tokens per micro-batch of {tokens:,}")


def assemble_model(run, parts, dtype: torch.dtype) -> models.Transformer:
    """The whole model from the named weights each rank sent (None from ranks that hold none); where two parts hold
    the same name (tied copies), the later part's tensor is kept."""
    model = models.Transformer(run.model_cfg, run.args.attn_implementation)
    model.load_state_dict({name: t for part in parts if part for name, t in part.items()})
    return model.to(dtype)


def data_streams(run, tokenizer, rows: int, rank: int, world: int, train: bool = True):
    """(training stream or None without `train`, held-out batches) of `rows` rows each, for shard `rank` of `world`.
    The held-out batches are always document-masked, so runs with and without --no-document-mask compare.

    Reading a bad file or line is one clear error (bad_input).
    """
    args = run.args
    with bad_input():
        stream = None
        if train:
            stream = data.PackedStream(
                run.mix, tokenizer, args.max_length, rows, rank=rank, world_size=world, seed=args.seed,
                dispatch=args.dispatch_batches, joined=args.no_document_mask,
            )  # fmt: skip
        evals = data.eval_batches(
            run.mix, tokenizer, args.max_length, rows, args.eval_batches, rank=rank, world_size=world
        )
    return stream, evals


def build_optimizer(run, module: torch.nn.Module) -> torch.optim.Optimizer:
    args = run.args
    with bad_input():  # e.g. Muon on sharded parameters
        return optim.build_optimizer(
            args.optimizer,
            module,
            run.plan.max_lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            stochastic_rounding=not args.no_stochastic_rounding,
            compiled=args.compile,  # Adafactor's step compiled with the loss path
        )


def label_count(batches: list[dict]) -> float:
    """Labels of the host batches, counted in numpy: no device and no dispatcher involved."""
    return float(sum(np.count_nonzero(b["labels"].numpy() != data.IGNORE_INDEX) for b in batches))


def to_device(batch: dict, device: torch.device, varlen: bool = False) -> dict:
    """A host batch on `device` (non-blocking); doc_ids None when every row holds one document, decided on the host
    so the mask needs no read of the device copy. `varlen`: with the varlen backend's document offsets, built here
    from the host copy."""
    if varlen:
        rows, length = batch["input_ids"].shape
        batch = batch | {"cu_seqlens": models.varlen_offsets(batch["doc_ids"], rows, length)}
    return {k: v.to(device, non_blocking=True) if k != "doc_ids" or v.numpy().any() else None for k, v in batch.items()}


def micro_batches(batches: list[dict], rows: int) -> list[dict]:
    """Batches cut into micro-batches of `rows` rows each, in row order (a pipeline's view of its rows)."""
    return [
        {k: v[start : start + rows] for k, v in batch.items()}
        for batch in batches
        for start in range(0, len(batch["input_ids"]), rows)
    ]


def start_batches(stream: data.PackedStream | None, data_state: dict | None, prefetch: bool = True, pin: bool = False):
    """The training batches of `stream` (None: this rank reads none), resumed at `data_state` when given.

    Prepared on a thread while the model trains, except a dispatched stream, which must stay on this thread; `pin`
    (a CUDA device): in page-locked memory, so `to_device`'s copies do not wait for the host.
    ValueError when the saved state does not fit the data mix (bad input on resume).
    """
    if stream is None:
        return None
    if data_state is not None:
        stream.load_state_dict(data_state)
    return data.Prefetcher(stream, pin=pin) if prefetch and not stream.dispatch else stream
