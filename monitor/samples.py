"""Evaluation on the held-out batches, and text samples from fixed prompts (temperature, top-k, repetition penalty)."""

from __future__ import annotations

import math

import torch

PROMPTS = ("The", "Once upon a time", "In this chapter, we")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_k: int = 40,
    repetition_penalty: float = 1.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> str:
    """Sample a continuation of ``prompt`` with a transformers fast tokenizer; stops at EOS. No KV cache: samples are
    short.

    The generator is local and seeded, so sampling never disturbs the training RNG streams.
    """
    from data import bos_eos_ids

    bos, eos = bos_eos_ids(tokenizer)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = [bos] + tokenizer.encode(prompt, add_special_tokens=False)
    limit = getattr(getattr(model, "cfg", None), "max_position_embeddings", 4096)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-limit:]], device=device)
        logits = model(x)[0, -1].float().cpu()
        if repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            scores = logits[seen]
            logits[seen] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            probs = torch.softmax(logits, -1)
            if torch.isfinite(probs).all() and probs.sum() > 0:
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            else:  # extreme settings overflowed the logits: greedy rather than a failed sample
                nxt = int(torch.nan_to_num(logits, nan=-float("inf")).argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    model.train(was_training)
    return tokenizer.decode(ids[1:], skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, batches: list[dict], device, byte_lengths: torch.Tensor, reduce_sum=lambda t: t) -> dict:
    """Held-out loss and bits per byte over this rank's share of the batches; ``reduce_sum`` sums across ranks.

    Both come from the same per-token losses: loss = their mean over every label; bits per byte = the nats of the
    labels that stand for text over ln 2 x their UTF-8 bytes (``byte_lengths``: bytes per token id, 0 for special
    tokens, see data.token_byte_lengths), which does not depend on the tokenizer.
    """
    was_training = model.training
    model.eval()
    byte_lengths = byte_lengths.to(device)
    total = torch.zeros(4, dtype=torch.float64, device=device)  # nats, labels, text nats, bytes
    for batch in batches:
        if not batch["doc_ids"].numpy().any():  # one document per row, decided on the host (no device read)
            batch = {**batch, "doc_ids": None}
        batch = {k: v.to(device) for k, v in batch.items() if v is not None}
        nats = model(**batch, reduction="none").double()  # (B, T), 0 where there is no label
        total += eval_sums(nats, batch["labels"], byte_lengths)
    model.train(was_training)
    return eval_metrics(reduce_sum(total))


def eval_sums(nats: torch.Tensor, labels: torch.Tensor, byte_lengths: torch.Tensor) -> torch.Tensor:
    """[summed nats, labels, nats of the labels that stand for text, their bytes] of one batch, float64."""
    valid = labels != -100
    num_bytes = byte_lengths[labels.clamp(min=0)] * valid
    nats = nats.double()
    return torch.stack([nats.sum(), valid.sum().double(), (nats * (num_bytes > 0)).sum(), num_bytes.sum().double()])


def eval_metrics(total: torch.Tensor) -> dict:
    """loss and bits_per_byte from the sums of ``eval_sums`` (over all batches and ranks)."""
    nats, labels, text_nats, num_bytes = total.tolist()
    return {
        "loss": nats / max(labels, 1.0),
        "bits_per_byte": text_nats / (math.log(2) * num_bytes) if num_bytes else math.nan,
    }
