"""models/memory.py against the real thing: the tensors autograd saves, the optimizers' state, the gradients."""

from __future__ import annotations

import pytest
import torch

import models
import optim
from models.config import ModelConfig
from models.memory import estimate_memory, parameter_shapes

SMALL = {
    "llama": dict(family="llama", num_key_value_heads=2),
    "qwen3": dict(family="qwen3", qk_norm=True, num_key_value_heads=2),
    "deepone": dict(family="deepone", qk_norm=True, tie_word_embeddings=False),
}


def _cfg(family: str, **change) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=96, intermediate_size=224, num_hidden_layers=3, num_attention_heads=6)
    return ModelConfig(**{**base, **SMALL[family], **change})


def _saved_activation_bytes(cfg: ModelConfig, batch: int, length: int, attn: str, documents: bool) -> int:
    """Bytes of every distinct non-parameter storage autograd saves in one forward pass with the loss.

    Packed sdpa is measured in its dense-mask form, the one GPUs run and the estimate models: on CPU, sdpa attends one
    document at a time unless the mask must keep one form (models/attention.py), so the form is forced here.
    """
    import models.model

    build = models.model.build_attention_mask
    models.model.build_attention_mask = lambda *a, **k: build(*a, **{**k, "same_form": attn == "sdpa" and documents})
    try:
        return _saved_bytes(cfg, batch, length, attn, documents)
    finally:
        models.model.build_attention_mask = build


def _saved_bytes(cfg: ModelConfig, batch: int, length: int, attn: str, documents: bool) -> int:
    torch.manual_seed(0)
    model = models.Transformer(cfg, attn)
    model.init_weights()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    doc_ids = (torch.arange(length) >= length // 3).long().expand(batch, length) if documents else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, doc_ids=doc_ids)
    return sum(saved.values())


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("documents", [True, False], ids=["packed", "one-document"])
def test_activations_match_the_tensors_autograd_saves(family, attn, documents):
    cfg = _cfg(family)
    for batch, length in ((1, 64), (3, 128)):
        measured = _saved_activation_bytes(cfg, batch, length, attn, documents)
        estimate = estimate_memory(
            cfg, micro_batch=batch, seq_len=length, attn_implementation=attn, documents=documents
        )["activations"]
        assert estimate == pytest.approx(measured, rel=0.03), (family, attn, documents, batch, length)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_parameters_gradients_and_optimizer_state_equal_the_real_ones(optimizer):
    cfg = _cfg("deepone")
    model = models.Transformer(cfg)
    model.init_weights()
    assert parameter_shapes(cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = optim.build_optimizer(optimizer, model, 1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).backward()
    grads = sum(p.grad.nbytes for p in model.parameters())
    opt.step()
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    est = estimate_memory(cfg, micro_batch=2, seq_len=32, optimizer=optimizer)
    assert est["parameters"] == sum(p.nbytes for p in model.parameters()) == 4 * models.count_parameters(cfg)["total"]
    assert est["gradients"] == grads
    assert est["optimizer"] == state
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


def test_bf16_weights_halve_parameters_and_gradients_but_not_adafactor_state():
    cfg = _cfg("llama")
    fp32 = estimate_memory(cfg, micro_batch=2, seq_len=64, optimizer="adafactor")
    bf16 = estimate_memory(cfg, micro_batch=2, seq_len=64, optimizer="adafactor", param_dtype="bf16")
    assert bf16["parameters"] * 2 == fp32["parameters"] and bf16["gradients"] * 2 == fp32["gradients"]
    assert bf16["optimizer"] == fp32["optimizer"]  # fp32 factored statistics either way
    assert bf16["activations"] < fp32["activations"]


def test_layouts_divide_what_they_shard():
    cfg = _cfg("llama", num_hidden_layers=8)
    kw = dict(micro_batch=2, seq_len=64, optimizer="adamw")
    ddp = estimate_memory(cfg, **kw)
    block = sum(p.numel() for n, p in models.Transformer(cfg).named_parameters() if n.startswith("layers.0.")) * 4
    fsdp = estimate_memory(cfg, layout="fsdp", world=4, **kw)
    assert fsdp["parameters"] == -(-ddp["parameters"] // 4) + block
    assert fsdp["optimizer"] == -(-ddp["optimizer"] // 4) and fsdp["activations"] == ddp["activations"]
    assert estimate_memory(cfg, layout="pipeline", stages=1, **kw)["parameters"] == ddp["parameters"]
    two = estimate_memory(cfg, layout="pipeline", stages=2, **kw)
    assert ddp["parameters"] / 2 <= two["parameters"] < ddp["parameters"]
    gpipe = estimate_memory(cfg, layout="pipeline", stages=2, in_flight=4, **kw)
    assert gpipe["activations"] > two["activations"]
    saved = estimate_memory(cfg, checkpointing=True, **kw)
    assert saved["activations"] < ddp["activations"] / 2


def test_bad_arguments_are_value_errors():
    cfg = _cfg("llama")
    for bad in (dict(layout="zero3"), dict(optimizer="sgd"), dict(micro_batch=0), dict(stages=-1)):
        with pytest.raises(ValueError):
            estimate_memory(cfg, **{"micro_batch": 1, "seq_len": 8, **bad})
