"""Evaluation on the held-out batches, and text samples from fixed prompts (temperature, top-k, repetition penalty)."""

from __future__ import annotations

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
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if nxt == eos:
            break
        ids.append(nxt)
    model.train(was_training)
    return tokenizer.decode(ids[1:], skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, batches: list[dict], device, reduce_sum=lambda t: t) -> float:
    """Token-weighted mean loss over this rank's share of the held-out batches; ``reduce_sum`` sums across ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = (batch["labels"] != -100).sum()
        total += torch.stack([model(**batch).double() * n, n.double()])
    model.train(was_training)
    total = reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()
