"""Every attention backend computes the same document-local causal attention (outputs and gradients)."""

import importlib.util

import pytest
import torch
from test_models import build, packed_batch, segments, small_config

import models
from models import Transformer, check_attn_implementation
from models.attention import FLASH_MISSING, attend, build_attention_mask

CPU_BACKENDS = ["eager", "sdpa", "flex_attention", "varlen"]  # varlen: its CPU reference, from its offsets
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def reference_attention(q, k, v, doc_ids):
    """Attention written from the definition, one query at a time: keys <= query and in the same document."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [s for s in range(t + 1) if doc_ids[b, s] == doc_ids[b, t]]
                scores = q[b, h, t] @ k[b, h // rep, keys].T / D**0.5
                out[b, h, t] = torch.softmax(scores, -1) @ v[b, h // rep, keys]
    return out


@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_backend_matches_the_definition(implementation):
    g = torch.Generator().manual_seed(0)
    batch = packed_batch(50)
    doc_ids = batch["doc_ids"]
    B, T = doc_ids.shape
    q = torch.randn(B, 4, T, 8, generator=g)  # 4 query heads sharing 2 kv heads
    k, v = torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)
    with torch.no_grad():
        mask = build_attention_mask(implementation, doc_ids, B, T, q.device)
        out = attend(q, k, v, mask)
    assert (out - reference_attention(q, k, v, doc_ids)).abs().max().item() <= 1e-5


def run(model: Transformer, batch: dict):
    loss = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
    loss.backward()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen3", "deepone"])
def test_backends_agree_on_outputs_and_gradients(family):
    """Tolerance: 1e-5 absolute on fp32 logits and loss, 1e-5 absolute + 1e-4 relative on every gradient."""
    cfg = small_config(family)
    batch = packed_batch(cfg.vocab_size)
    results = {impl: run(build(cfg, impl), batch) for impl in CPU_BACKENDS}
    ref_logits, ref_loss, ref_grads = results["eager"]
    for impl in CPU_BACKENDS[1:]:
        logits, loss, grads = results[impl]
        assert (logits - ref_logits).abs().max().item() <= 1e-5, impl
        assert abs(loss.item() - ref_loss.item()) <= 1e-5, impl
        for name, grad in ref_grads.items():
            assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), (impl, name)


def test_flex_on_cpu_uses_a_block_mask_for_inference():
    """The flex forward on CPU is FlexAttention itself (its backward falls back to sdpa, see models/attention.py)."""
    from torch.nn.attention.flex_attention import BlockMask

    batch = packed_batch(50)
    with torch.no_grad():
        mask = build_attention_mask("flex_attention", batch["doc_ids"], 3, 37, torch.device("cpu"))
    assert isinstance(mask.block_mask, BlockMask) and mask.dense is None
    dense = mask.block_mask.to_dense()  # (B, 1, q blocks, kv blocks): one 128-token block for T = 37
    assert dense.shape[0] == 3


def test_single_document_rows_use_the_plain_causal_path():
    doc_ids = torch.zeros(2, 9, dtype=torch.long)
    mask = build_attention_mask("sdpa", doc_ids, 2, 9, torch.device("cpu"))
    assert mask.single_document and mask.dense is None
    packed = build_attention_mask("sdpa", packed_batch(50)["doc_ids"], 3, 37, torch.device("cpu"))
    assert not packed.single_document and packed.dense is None
    # CPU sdpa attends one document at a time: the segments of the flattened rows, row boundaries included
    assert packed.lengths == [end - start for _, start, end in segments()]
    same_form = build_attention_mask("sdpa", packed_batch(50)["doc_ids"], 3, 37, torch.device("cpu"), same_form=True)
    assert same_form.lengths is None and same_form.dense.shape == (3, 1, 37, 37)  # compiled blocks: one mask form


def test_short_documents_keep_the_dense_mask():
    """Below MIN_DOCUMENT_TOKENS per document on average, per-document calls cost more than the scores they skip."""
    from models.attention import MIN_DOCUMENT_TOKENS

    T = 4 * MIN_DOCUMENT_TOKENS
    for length, by_document in ((MIN_DOCUMENT_TOKENS, True), (MIN_DOCUMENT_TOKENS - 1, False)):
        doc_ids = (torch.arange(T) // length).expand(2, T)
        mask = build_attention_mask("sdpa", doc_ids, 2, T, torch.device("cpu"))
        assert (mask.lengths is not None) == by_document and (mask.dense is None) == by_document, length


def test_sdpa_by_document_equals_the_dense_mask_with_gradients():
    """The per-document CPU path (views of (B, T, heads, D) tensors, as the model passes them) against sdpa with
    the dense document mask: outputs and q/k/v gradients."""
    g = torch.Generator().manual_seed(1)
    doc_ids = packed_batch(50)["doc_ids"]
    B, T = doc_ids.shape
    q, k, v = (torch.randn(B, T, h, 8, generator=g).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
    by_doc = build_attention_mask("sdpa", doc_ids, B, T, q.device)
    dense = build_attention_mask("sdpa", doc_ids, B, T, q.device, same_form=True)
    assert by_doc.lengths is not None and len(by_doc.lengths) > B and dense.dense is not None
    grad_out = torch.randn(B, 4, T, 8, generator=g)
    results = []
    for mask in (by_doc, dense):
        out = attend(q, k, v, mask)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for a, b in zip(*results, strict=True):
        assert (a - b).abs().max().item() <= 1e-5


def test_flash_cu_seqlens_follow_documents_and_rows():
    batch = packed_batch(50)
    mask = build_attention_mask("flash_attention_2", batch["doc_ids"], 3, 37, torch.device("cpu"))
    starts = [row * 37 + s for row, s, _ in segments()]
    assert mask.cu_seqlens.tolist() == starts + [3 * 37]
    assert mask.max_seqlen == 37 and mask.cu_seqlens.dtype == torch.int32


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn is installed here")
def test_missing_flash_attn_is_a_value_error_with_install_hint():
    with pytest.raises(ValueError, match="pip install flash-attn") as err:
        check_attn_implementation("flash_attention_2")
    assert str(err.value) == FLASH_MISSING and "\n" not in FLASH_MISSING
    with pytest.raises(ValueError, match="pip install flash-attn"):
        Transformer(small_config(), "flash_attention_2")


def test_flex_on_too_old_torch_names_the_minimum_version(monkeypatch):
    import models.attention as attention

    monkeypatch.setattr(attention, "_torch_version", lambda: (2, 4))
    with pytest.raises(ValueError, match=r"torch >= 2\.5"):
        check_attn_implementation("flex_attention")
    check_attn_implementation("sdpa")  # the other backends do not care


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="sdpa"):
        check_attn_implementation("flash3")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_FLASH), reason="needs CUDA and flash-attn")
def test_flash_attention_matches_sdpa_on_cuda():  # pragma: no cover - runs only on GPU machines
    cfg = small_config()
    batch = {k: v.cuda() for k, v in packed_batch(cfg.vocab_size).items()}
    outs = {}
    for impl in ("sdpa", "flash_attention_2", "flex_attention"):
        model = build(cfg, impl).cuda().bfloat16()
        with torch.no_grad():
            outs[impl] = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
    assert (outs["flash_attention_2"] - outs["sdpa"]).abs().max().item() < 5e-2
    assert (outs["flex_attention"] - outs["sdpa"]).abs().max().item() < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_varlen_kernel_matches_the_fp32_reference_on_cuda():  # pragma: no cover - runs only on GPU machines
    """torch's varlen kernel (bf16), from host-built padded offsets, against the fp32 CPU reference: outputs and
    gradients, with GQA and head_dim 96; flex (bf16) beside it sets the tolerance."""
    g = torch.Generator().manual_seed(3)
    doc_ids = packed_batch(50)["doc_ids"]
    B, T = doc_ids.shape
    q, k, v = (torch.randn(B, T, h, 96, generator=g).transpose(1, 2) for h in (4, 2, 2))
    grad_out = torch.randn(B, 4, T, 96, generator=g)
    results = {}
    for impl, device, dtype in (
        ("sdpa", "cpu", torch.float32),
        ("varlen", "cuda", torch.bfloat16),
        ("flex_attention", "cuda", torch.bfloat16),
    ):
        qd, kd, vd = (x.to(device, dtype).requires_grad_() for x in (q, k, v))
        ids = doc_ids.to(device)
        cu = models.varlen_offsets(doc_ids, B, T).to(device) if impl == "varlen" else None
        mask = build_attention_mask(impl, ids, B, T, torch.device(device), cu_seqlens=cu)
        out = attend(qd, kd, vd, mask)
        grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.to(device, dtype))
        results[impl] = [t.float().cpu() for t in (out, *grads)]
    for ref, got, other in zip(results["sdpa"], results["varlen"], results["flex_attention"], strict=True):
        assert (got - ref).abs().max().item() <= 2 * max((other - ref).abs().max().item(), 1e-2)


def test_varlen_offsets_follow_documents_and_rows_padded_to_a_fixed_capacity():
    from models.attention import varlen_capacity, varlen_offsets

    batch = packed_batch(50)
    starts = [row * 37 + s for row, s, _ in segments()]
    offsets = varlen_offsets(batch["doc_ids"], 3, 37)
    assert varlen_capacity(3, 37) == 4  # one document per row fits: 3 + 1 offsets
    assert offsets.dtype == torch.int32 and len(starts) == 7 and len(offsets) == 8  # 7 documents: the next power
    assert offsets.tolist() == starts + [3 * 37]
    assert varlen_offsets(None, 2, 37).tolist() == [0, 37, 74, 74]  # the padding: an empty document at the end
    # the capacity depends on the shape alone until documents average under 128 tokens
    assert varlen_capacity(4, 4096) == varlen_capacity(4, 4096, 100) == 256
    assert varlen_capacity(4, 4096, 300) == 512
    many = (torch.arange(37) // 2).expand(3, 37)  # 19 documents per row: 57 segments
    assert len(varlen_offsets(many, 3, 37)) == 64 and varlen_offsets(many, 3, 37)[57].item() == 111


def test_varlen_masks_from_offsets_equal_the_document_rule():
    """Eager and compiled (one form) CPU references, built from the padded offsets, against the document rule."""
    from models.attention import _dense_document_mask, varlen_offsets

    doc_ids = packed_batch(50)["doc_ids"]
    cu = varlen_offsets(doc_ids, 3, 37)
    eager = build_attention_mask("varlen", doc_ids, 3, 37, torch.device("cpu"), cu_seqlens=cu)
    assert eager.lengths == [end - start for _, start, end in segments()] and eager.max_seqlen == 37
    compiled = build_attention_mask("varlen", doc_ids, 3, 37, torch.device("cpu"), cu_seqlens=cu, same_form=True)
    assert torch.equal(compiled.dense, _dense_document_mask(doc_ids))
    built_here = build_attention_mask("varlen", doc_ids, 3, 37, torch.device("cpu"))  # no offsets: built from ids
    assert torch.equal(built_here.cu_seqlens, cu)


def test_the_data_path_gives_varlen_its_offsets_from_the_host_batch():
    from parallel.build import to_device

    batch = {k: v for k, v in packed_batch(50).items()}
    on_device = to_device(batch, torch.device("cpu"), varlen=True)
    assert torch.equal(on_device["cu_seqlens"], models.varlen_offsets(batch["doc_ids"], 3, 37))
    assert "cu_seqlens" not in to_device(batch, torch.device("cpu"))
