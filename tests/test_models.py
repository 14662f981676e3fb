"""The model against independent oracles: Hugging Face transformers, per-document runs, naive loss, the paper's init."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, Transformer, count_parameters, load_model_config
from models.attention import build_attention_mask
from models.config import available_configs
from models.loss import chunked_cross_entropy, default_chunk_size, memory_chunk_size
from models.model import rope_cos_sin

DOC_LENGTHS = [(10, 20, 7), (37,), (1, 16, 20)]  # three rows of T = 37: several documents, one, a 1-token document


def small_config(family: str = "llama", **overrides) -> ModelConfig:
    """A few-layer GQA config of each family, small enough for CPU tests."""
    base = dict(
        family=family,
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=family != "deepone",
        qk_norm=family != "llama",
    )
    base.update(overrides)
    return ModelConfig(**base)


def packed_batch(vocab_size: int, doc_lengths=DOC_LENGTHS, seed: int = 0) -> dict:
    """A batch in the data contract: input_ids, labels (already shifted, -100 across documents), positions, doc ids."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "position_ids": [], "doc_ids": []}
    for lengths in doc_lengths:
        T = sum(lengths)
        stream = torch.randint(0, vocab_size, (T + 1,), generator=g)  # T + 1 consecutive tokens of the stream
        doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        doc_next = torch.cat([doc[1:], doc[-1:]])  # the (T+1)-th token continues the last document
        labels = torch.where(doc_next == doc, stream[1:], -100)
        rows["input_ids"].append(stream[:T])
        rows["labels"].append(labels)
        rows["position_ids"].append(torch.cat([torch.arange(n) for n in lengths]))
        rows["doc_ids"].append(doc)
    return {k: torch.stack(v) for k, v in rows.items()}


def segments(doc_lengths=DOC_LENGTHS):
    """(row, start, end) of every document segment."""
    for row, lengths in enumerate(doc_lengths):
        start = 0
        for n in lengths:
            yield row, start, start + n
            start += n


def build(cfg: ModelConfig, attn_implementation: str = "sdpa", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg, attn_implementation)
    model.init_weights()
    return model


# ---- configs and parameter counts ----


def test_default_model_has_the_documented_size():
    cfg = load_model_config("deepone-162m", vocab_size=32000)
    counts = count_parameters(cfg)
    assert abs(counts["total"] - 162.4e6) <= 0.1e6, counts
    assert abs(counts["non_embedding"] - 113.3e6) <= 0.1e6, counts
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.post_norm, cfg.qk_norm) == (96, 8, True, True)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]


@pytest.mark.parametrize("name", available_configs())
def test_count_parameters_matches_the_module(name):
    cfg = load_model_config(name, vocab_size=3001)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = count_parameters(cfg)
    real = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    head = 0 if model.lm_head is None else model.lm_head.weight.numel()
    assert counts["total"] == real
    assert counts["non_embedding"] == real - embedding - head
    linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert counts["matmul"] == linear + cfg.vocab_size * cfg.hidden_size
    assert cfg.max_position_embeddings >= (1024 if name == "tiny" else 4096)


def test_named_shapes():
    assert load_model_config("tiny").tie_word_embeddings
    llama1b = load_model_config("llama-1b")
    assert (llama1b.hidden_size, llama1b.num_hidden_layers, llama1b.num_key_value_heads, llama1b.rope_theta) == (
        2048,
        16,
        8,
        500000.0,
    )
    qwen = load_model_config("qwen3-0.6b")
    assert (qwen.family, qwen.head_dim, qwen.qk_norm, qwen.rope_theta) == ("qwen3", 128, True, 1e6)
    assert 1e6 <= count_parameters(load_model_config("tiny", vocab_size=3000))["total"] <= 3e6


def test_load_model_config_errors_and_user_file(tmp_path):
    with pytest.raises(ValueError, match="deepone-162m"):  # the message lists the available names
        load_model_config("no-such-model")
    with pytest.raises(ValueError, match="does not exist"):
        load_model_config(str(tmp_path / "missing.json"))
    user = tmp_path / "mine.json"
    user.write_text(json.dumps(small_config().to_dict() | {"vocab_size": 50}))
    assert load_model_config(str(user), vocab_size=77).vocab_size == 77
    user.write_text(json.dumps({"hidden_size": 64, "hiden_layers": 2}))
    with pytest.raises(ValueError, match="hiden_layers"):
        load_model_config(str(user))
    with pytest.raises(ValueError, match="multiple"):
        small_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="qk_norm"):
        small_config("qwen3", qk_norm=False)


# ---- exactness against Hugging Face transformers ----


def hf_twin(model: Transformer, cfg: ModelConfig, tmp_path):
    """The same weights in transformers' own class, built from our exported config."""
    from transformers import AutoModelForCausalLM

    from models import export_hf

    export_hf(model, cfg, tmp_path / cfg.family)
    return AutoModelForCausalLM.from_pretrained(tmp_path / cfg.family, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_forward_equals_transformers_per_document(family, tmp_path):
    cfg = small_config(family)
    model = build(cfg)
    hf = hf_twin(model, cfg, tmp_path)
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    batch = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        loss = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
        total, count = 0.0, 0
        for row, start, end in segments():
            ref = hf(batch["input_ids"][row : row + 1, start:end]).logits[0]  # the document alone, positions 0..
            assert (logits[row, start:end] - ref).abs().max().item() <= 1e-4
            labels = batch["labels"][row, start:end]
            total += F.cross_entropy(ref, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
        # transformers' own packed path (document boundaries read from restarting position_ids) agrees too
        packed = hf(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert (logits - packed).abs().max().item() <= 1e-4
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def test_document_masking_is_real_not_only_position_resets():
    cfg = small_config("qwen3")
    model = build(cfg)
    batch = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        masked = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        unmasked = model(batch["input_ids"], batch["position_ids"], None)  # same positions, no document mask
        per_doc = [model(batch["input_ids"][r : r + 1, s:e])[0] for r, s, e in segments()]
    alone = [masked[r, s:e] for r, s, e in segments()]
    assert max((a - b).abs().max().item() for a, b in zip(alone, per_doc, strict=True)) <= 1e-5
    # later documents of row 0 see earlier ones without the mask: outputs change
    assert (unmasked[0, 10:] - masked[0, 10:]).abs().max().item() > 1e-2
    assert torch.allclose(unmasked[0, :10], masked[0, :10], atol=1e-5)  # the first document is unaffected


def test_loss_of_packed_batch_equals_per_document_losses():
    cfg = small_config("deepone")
    model = build(cfg)
    batch = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        loss = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
        losses, counts = [], []
        for r, s, e in segments():
            labels = batch["labels"][r, s:e]
            logits = model(batch["input_ids"][r : r + 1, s:e])[0]
            losses.append(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            counts.append(int((labels != -100).sum()))
    assert loss.item() == pytest.approx(sum(losses).item() / sum(counts), abs=1e-5)


def test_defaults_mean_one_document_per_row():
    cfg = small_config()
    model = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        explicit = model(ids, torch.arange(19).expand(2, 19), torch.zeros(2, 19, dtype=torch.long))
        default = model(ids)
    assert default.dtype == torch.float32 and default.shape == (2, 19, cfg.vocab_size)
    assert torch.allclose(explicit, default, atol=1e-6)


# ---- chunked loss ----


@pytest.mark.parametrize("tied,size", [(True, 16), (False, 16), (True, 4096)])
def test_chunked_loss_equals_naive_loss_and_gradients(tied, size):
    """16: 111 tokens in 7 chunks, the last one partial; 4096: one chunk (as a big GPU runs it)."""
    cfg = small_config(tie_word_embeddings=tied)
    batch = packed_batch(cfg.vocab_size)
    grads, losses = [], []
    for chunked in (True, False):
        model = build(cfg)
        model.loss_chunk_size = size
        if chunked:
            loss = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
        else:
            logits = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for name in grads[1]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp32-output GEMMs run on CUDA")
def test_bf16_head_gradient_is_summed_in_fp32_on_cuda():
    """bf16 hidden states and head on CUDA, 4 chunks: the head's gradient matches an fp64 computation from the same
    bf16 inputs to fp32 accuracy (not bf16's 4e-3), as an fp32-output GEMM sums it."""
    torch.manual_seed(0)
    hidden = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (512,), device="cuda")
    chunked_cross_entropy(hidden, weight, labels, chunk_size=128).backward()
    h, w = hidden.detach().double(), weight.detach().double().requires_grad_()
    F.cross_entropy(h @ w.t(), labels).backward()
    # the chunk's logits gradient is bf16 by design; its product with h is what the GEMM sums in fp32
    assert torch.allclose(weight.grad.double(), w.grad, atol=2e-3 * w.grad.abs().max().item(), rtol=0)


def test_loss_chunks_follow_the_memory_left():
    """The default job's micro-batch (16,384 tokens, vocab 32,768, hidden 768): one chunk where 4 GiB are free,
    the default 1,024 tokens where nothing is, and chunks in between that fit their budget."""
    size = lambda budget: memory_chunk_size(16384, 768, 32768, budget, logit_bytes=2)  # noqa: E731
    assert size(4 * 2**30) == 16384 and size(0) == default_chunk_size(16384, 768, 32768) == 1024
    middle = size(2**30)
    assert 1024 < middle < 16384 and middle * 32768 * 8 <= 2**30 < (middle + 1) * 32768 * 8


def test_chunked_cross_entropy_scaling_and_eval_path():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (50,), generator=g)
    labels[::3] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, num_items=100, chunk_size=7)
    (3.0 * loss).backward()  # the incoming gradient scales the precomputed ones
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.t(), labels, ignore_index=-100, reduction="sum") / 100
    (3.0 * ref).backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(hidden.grad, ref_h.grad, atol=1e-6) and torch.allclose(weight.grad, ref_w.grad, atol=1e-6)
    # A second backward through the retained graph (the zero-bubble schedules' split backward) gives the same
    # gradients again: the precomputed ones are not consumed.
    hidden.grad = weight.grad = None
    loss2 = chunked_cross_entropy(hidden, weight, labels, num_items=100, chunk_size=7)
    (3.0 * loss2).backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    (3.0 * loss2).backward()
    assert torch.allclose(hidden.grad, 2 * first[0]) and torch.allclose(weight.grad, 2 * first[1])
    with torch.no_grad():
        count = int((labels != -100).sum())  # the default divisor: this batch's labelled positions
        assert torch.allclose(chunked_cross_entropy(hidden, weight, labels, chunk_size=7), ref * 100 / count, atol=1e-6)


def test_loss_in_bf16_and_under_autocast_is_close_to_fp32():
    cfg = small_config()
    batch = packed_batch(cfg.vocab_size)
    args = (batch["input_ids"], batch["position_ids"], batch["doc_ids"])
    model = build(cfg)
    ref = model(*args, labels=batch["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(*args, labels=batch["labels"])
    mixed.backward()
    assert mixed.dtype == torch.float32 and abs(mixed.item() - ref.item()) < 2e-2
    assert model.embed_tokens.weight.grad.dtype == torch.float32
    bf16 = build(cfg).to(torch.bfloat16)
    loss = bf16(*args, labels=batch["labels"])
    loss.backward()
    assert abs(loss.item() - ref.item()) < 5e-2
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in bf16.parameters())


# ---- DeepNet ----


def test_deepnet_constants_and_init_gains():
    cfg = load_model_config("deepone-162m", vocab_size=512)
    n = cfg.num_hidden_layers
    assert cfg.deepnet_alpha == pytest.approx((2 * n) ** 0.25) and cfg.deepnet_alpha == pytest.approx(32**0.25)
    assert cfg.deepnet_beta == pytest.approx((8 * n) ** -0.25)
    model = build(cfg)
    beta = cfg.deepnet_beta
    for block in model.layers[:2]:
        assert block.alpha == pytest.approx(cfg.deepnet_alpha)
        attn, mlp = block.self_attn, block.mlp
        for weight, gain in [
            (attn.q_proj.weight, 1.0),
            (attn.k_proj.weight, 1.0),
            (attn.v_proj.weight, beta),
            (attn.o_proj.weight, beta),
            (mlp.gate_proj.weight, beta),
            (mlp.up_proj.weight, beta),
            (mlp.down_proj.weight, beta),
        ]:
            fan_out, fan_in = weight.shape
            expected = gain * math.sqrt(2.0 / (fan_in + fan_out))  # Xavier-normal
            assert weight.std().item() == pytest.approx(expected, rel=0.02)
            assert abs(weight.mean().item()) < 0.05 * expected
        assert torch.all(attn.q_norm.weight == 1) and torch.all(block.attn_norm.weight == 1)
    assert isinstance(model.norm, torch.nn.Identity) and model.lm_head is not None


def test_deepnet_block_is_post_norm_with_alpha():
    cfg = small_config("deepone")
    model = build(cfg)
    block = model.layers[0]
    x = torch.randn(2, 5, cfg.hidden_size)
    pos = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        out = block(x, pos, None)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
        mask = build_attention_mask("sdpa", None, 2, 5, x.device)
        h = block.attn_norm(cfg.deepnet_alpha * x + block.self_attn(x, cos, sin, mask))
        ref = block.mlp_norm(cfg.deepnet_alpha * h + block.mlp(h))
    assert torch.allclose(out, ref, atol=1e-6)
    assert out.pow(2).mean(-1).sqrt().sub(1).abs().max() < 1e-3  # ends in an RMSNorm with unit weight


def test_llama_init_follows_initializer_range():
    cfg = small_config(hidden_size=256, intermediate_size=512)
    model = build(cfg)
    for weight in (
        model.layers[0].self_attn.q_proj.weight,
        model.layers[1].mlp.down_proj.weight,
        model.embed_tokens.weight,
    ):
        assert weight.std().item() == pytest.approx(0.02, rel=0.03)


def test_relu_glu_activation():
    cfg = small_config(hidden_act="relu")
    model = build(cfg)
    x = torch.randn(3, cfg.hidden_size)
    mlp = model.layers[0].mlp
    ref = mlp.down_proj.weight @ (torch.relu(mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
    assert torch.allclose(mlp(x), ref.T, atol=1e-5)
