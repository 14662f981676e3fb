"""Attention backends that keep every token inside its own document in packed rows.

A packed row holds several documents back to back; `doc_ids` (B, T) numbers them 0, 0, 0, 1, 1, 2, ... A query may
attend to a key only if the key is not in the future AND belongs to the same document. Each document's tokens are one
contiguous run of its row, as data/packing writes them: the dense and flex masks compare ids, while CPU sdpa and
flash cut each row where the id changes, and the two agree only under that contract. Each backend expresses that
rule in its own way:

- eager:              explicit softmax(QK^T) with a boolean (B, 1, T, T) mask; the readable reference.
- sdpa:               torch's scaled_dot_product_attention with the same boolean mask; on CPU, each document of a
                      packed row instead runs as its own causal call, so no masked-out score is ever computed.
- flex_attention:     torch's FlexAttention with a BlockMask, so blocks that cross documents are skipped entirely.
- flash_attention_2:  flash-attn's varlen kernel; every document becomes its own sequence via cu_seqlens.
- varlen:             torch's own varlen kernel (torch.nn.attention.varlen, CUDA) in the form torch.compile keeps as
                      one graph: rows flattened, `cu_seqlens` built on the host (`varlen_offsets`) and padded with
                      empty documents to a capacity fixed by the batch shape, the row length as the constant maximum,
                      no host read inside the graph; head_dim 96 runs unpadded. On CPU a reference runs instead, from
                      the same offsets: sdpa document by document (eager) or with a dense mask (compiled).

When every row holds a single document, eager/sdpa use the plain causal path (`is_causal=True`, no mask tensor).

The mask is built once per forward pass (`build_attention_mask`) and shared by all layers; `attend` runs one layer.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "varlen")
# CPU sdpa attends document by document when the documents of a batch average at least this many tokens; below it,
# the per-call cost outweighs the skipped scores (2 x 256 tokens of 4-token documents: 8.5 ms by document, 5.9 dense).
MIN_DOCUMENT_TOKENS = 8
FLEX_MIN_TORCH = (2, 5)  # first release with torch.nn.attention.flex_attention

FLASH_MISSING = (
    "flash_attention_2 needs the flash-attn package: pip install flash-attn --no-build-isolation (CUDA only); "
    "or use --attn-implementation flex_attention"
)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_attn_implementation(name: str) -> None:
    """Raise ValueError when the backend is unknown or cannot run with the installed packages."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flex_attention" and _torch_version() < FLEX_MIN_TORCH:
        raise ValueError(
            f"flex_attention needs torch >= {'.'.join(map(str, FLEX_MIN_TORCH))} (found {torch.__version__}); "
            "upgrade torch or use --attn-implementation sdpa"
        )
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ValueError(FLASH_MISSING) from None
    if name == "varlen":
        try:
            importlib.import_module("torch.nn.attention.varlen")
        except ImportError:
            raise ValueError(
                f"varlen needs torch.nn.attention.varlen (torch >= 2.10; found {torch.__version__}); "
                "upgrade torch or use --attn-implementation flex_attention"
            ) from None


@dataclass
class AttentionMask:
    """Everything one forward pass needs to keep attention causal and inside documents.

    Only the fields of the chosen backend are filled; `single_document` means plain causal attention.
    """

    implementation: str
    single_document: bool
    dense: torch.Tensor | None = None  # (B, 1, T, T) bool, True = may attend (eager, sdpa, CPU-training flex)
    block_mask: object | None = None  # flex BlockMask
    cu_seqlens: torch.Tensor | None = None  # (num_segments + 1,) int32 offsets into the flattened B*T tokens
    max_seqlen: int = 0  # longest document segment (flash; varlen: the row length)
    lengths: list[int] | None = None  # lengths of the documents of the flattened B*T tokens, in order (CPU sdpa)


def _dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: causal and same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]  # (B, 1, T, T)


def _flex_block_mask(doc_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        num_batches = None  # one mask broadcast over the batch
    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        num_batches = batch
    # NOTE: on CUDA the mask is built by a compiled kernel; eager construction materialises B*T*T booleans.
    build = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return build(mask_mod, num_batches, None, seq_len, seq_len, device=device)


@functools.cache
def _compiled_create_block_mask():
    """One compiled `create_block_mask` for the process (torch compiles it lazily, at its first call)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def _segment_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B*T,) offsets of the flattened tokens where a document segment starts.

    A segment starts at every row start and wherever the document id changes.
    """
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts.flatten().nonzero().flatten()


def varlen_capacity(batch: int, seq_len: int, segments: int = 0) -> int:
    """Entries of a padded `cu_seqlens` for (batch, seq_len) rows: a power of two that holds rows of documents
    averaging 128 tokens or more, so nearly every batch of a shape has the same size (a compiled graph never
    recompiles); a batch with more documents gets the next power of two that holds them."""
    need = max(segments, batch * seq_len // 128 + batch) + 1
    return 1 << (need - 1).bit_length()


def varlen_offsets(doc_ids: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor:
    """Host (B, T) document ids (None: one document per row) -> int32 `cu_seqlens` of the flattened tokens, a
    segment wherever a row starts or the id changes, padded with empty documents (the total repeated) to
    `varlen_capacity`. Computed in numpy: no device and no host sync."""
    total = batch * seq_len
    if doc_ids is None:
        starts = np.arange(0, total, seq_len)
    else:
        ids = doc_ids.numpy().reshape(batch, seq_len)
        change = np.ones_like(ids, dtype=bool)
        change[:, 1:] = ids[:, 1:] != ids[:, :-1]
        starts = np.flatnonzero(change)
    offsets = np.full(varlen_capacity(batch, seq_len, len(starts)), total, dtype=np.int32)
    offsets[: len(starts)] = starts
    return torch.from_numpy(offsets)


def _varlen_segments(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Padded cu_seqlens -> (B, T) segment numbers of the tokens (the CPU reference's dense mask)."""
    tokens = torch.arange(batch * seq_len, device=cu_seqlens.device, dtype=torch.int32)
    return torch.bucketize(tokens, cu_seqlens[1:].contiguous(), right=True).view(batch, seq_len)


def _segment_lengths(doc_ids: torch.Tensor) -> list[int]:
    offsets = [*_segment_starts(doc_ids).tolist(), doc_ids.numel()]
    return torch.tensor(offsets).diff().tolist()


@torch.compiler.disable  # data-dependent (single-document check, max_seqlen): keep it out of compiled graphs
def build_attention_mask(
    implementation: str,
    doc_ids: torch.Tensor | None,
    batch: int,
    seq_len: int,
    device: torch.device,
    *,
    same_form: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> AttentionMask:
    """Build the per-forward mask for `implementation` from doc_ids (B, T); None means one document per row.

    NOTE: on a GPU, rows of one document each are best passed as None (the caller decides on its host copy: a read
    of the device copy here would be a host sync at every forward); all-zero doc_ids give the same result, slower.

    same_form: always build the document mask, even when every row holds one document, so every batch yields a
    mask of the same structure (compiled blocks then never recompile when a batch happens to be unpacked).

    cu_seqlens (varlen): the batch's padded offsets, built on the host by the data path (`varlen_offsets`); without
    them they are built here, from host doc_ids for free, from a device copy with one host read.
    """
    if implementation == "varlen":
        return _varlen_mask(doc_ids, batch, seq_len, device, cu_seqlens, same_form)
    if same_form and doc_ids is None:
        doc_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    if doc_ids is not None and not same_form and doc_ids.device.type == "cpu" and not doc_ids.numpy().any():
        doc_ids = None  # every row starts at document 0 and never leaves it (read in numpy: no device, no sync)
    single = doc_ids is None
    # NOTE: on CPU, sdpa runs packed rows one document at a time (see _sdpa) unless the mask must keep one form for
    # a compiled graph: a dense mask makes the kernel compute and discard every cross-document score. Each call costs
    # ~60 us (forward and backward), so documents shorter than MIN_DOCUMENT_TOKENS on average keep the dense mask.
    by_segments = implementation == "sdpa" or (implementation == "flex_attention" and torch.is_grad_enabled())
    lengths = None
    if by_segments and device.type == "cpu" and not single and not same_form:
        lengths = _segment_lengths(doc_ids)
    by_document = lengths is not None and len(lengths) * MIN_DOCUMENT_TOKENS <= batch * seq_len
    if implementation == "sdpa" and by_document:
        return AttentionMask(implementation, single, lengths=lengths)
    if implementation in ("eager", "sdpa"):
        return AttentionMask(implementation, single, dense=None if single else _dense_document_mask(doc_ids))
    if implementation == "flex_attention":
        mask = AttentionMask(implementation, single, block_mask=_flex_block_mask(doc_ids, batch, seq_len, device))
        if device.type == "cpu" and torch.is_grad_enabled() and not single:
            # NOTE: FlexAttention has no backward on CPU (torch 2.13); training there falls back to sdpa with the
            # same document rule (see _flex), so its segments (or mask) are prepared here too.
            if by_document:
                mask.lengths = lengths
            else:
                mask.dense = _dense_document_mask(doc_ids)
        return mask
    if implementation == "flash_attention_2":
        if doc_ids is None:
            doc_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        offsets = _segment_starts(doc_ids)
        end = torch.tensor([batch * seq_len], device=device)
        cu_seqlens = torch.cat([offsets, end]).to(torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return AttentionMask(implementation, single, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    check_attn_implementation(implementation)  # raises for an unknown name
    raise AssertionError(implementation)


def _varlen_mask(doc_ids, batch: int, seq_len: int, device: torch.device, cu_seqlens, same_form: bool) -> AttentionMask:
    if cu_seqlens is None:
        cu_seqlens = varlen_offsets(None if doc_ids is None else doc_ids.cpu(), batch, seq_len).to(device)
    single = doc_ids is None
    mask = AttentionMask("varlen", single, cu_seqlens=cu_seqlens, max_seqlen=seq_len)
    if device.type == "cpu":  # the reference: sdpa per document, or (one form for a compiled graph) a dense mask
        if same_form:
            mask.dense = _dense_document_mask(_varlen_segments(cu_seqlens, batch, seq_len))
        else:
            mask.lengths = [n for n in cu_seqlens.diff().tolist() if n]
    return mask


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Reference attention; q (B, H, T, D), k/v (B, KV, T, D) -> (B, H, T, D)."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, D): query head h reads kv head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    if mask.dense is None:
        T = q.shape[2]
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = mask.dense
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # the diagonal is always allowed: no NaN
    return probs @ v


def _sdpa_by_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Causal sdpa over each document segment of the flattened B*T tokens: the work of the unmasked scores only.

    q (B, H, T, D) and k/v (B, KV, T, D) are views of (B, T, heads, D) tensors (Attention.forward), so flattening to
    (B*T, heads, D) is free; split/cat keep autograd to one copy of each gradient (slicing per segment would
    allocate a full-size zero gradient for every segment).
    """
    B, H, T, D = q.shape
    gqa = H != k.shape[1]
    qs, ks, vs = (x.transpose(1, 2).reshape(B * T, x.shape[1], D).split(lengths) for x in (q, k, v))
    out = [
        F.scaled_dot_product_attention(
            qd.transpose(0, 1)[None], kd.transpose(0, 1)[None], vd.transpose(0, 1)[None], is_causal=True, enable_gqa=gqa
        )[0].transpose(0, 1)  # (len, H, D)
        for qd, kd, vd in zip(qs, ks, vs, strict=True)
    ]
    return torch.cat(out).view(B, T, H, D).transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    if mask.lengths is not None:
        return _sdpa_by_document(q, k, v, mask.lengths)
    if mask.dense is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    if n_rep > 1 and q.device.type == "cuda":
        # NOTE: with an explicit mask, CUDA serves enable_gqa only with the slow math kernel; repeat kv heads instead.
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=n_rep > 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # NOTE: uncompiled flex_attention materialises the full score matrix; compiling it once yields the fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    if q.device.type != "cpu":
        # inside torch.compile(model) the call is traced into the model's graph; outside, use our compiled copy
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        return flex(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # NOTE: torch 2.13 implements no FlexAttention backward on CPU; train with the identical mask through sdpa.
        if mask.dense is None and mask.lengths is None and not mask.single_document:
            raise RuntimeError("flex_attention on CPU needs gradients but the mask was built without grad mode")
        return _sdpa(q, k, v, mask)
    if torch.compiler.is_compiling():  # traced into the compiled loss path, which fuses it
        return flex_attention(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():
        # CPU inference uses the unfused implementation on purpose (compiling needs a C++ toolchain at run time).
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    B, H, T, D = q.shape
    # flash-attn wants (tokens, heads, head_dim); documents are the varlen sequences delimited by cu_seqlens.
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))
    out = flash_attn_varlen_func(
        q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen, causal=True
    )  # (B*T, H, D); GQA is native
    return out.reshape(B, T, H, D).transpose(1, 2)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    B, H, T, D = q.shape
    if q.device.type == "cpu":  # no CPU kernel: the reference, from the same offsets
        return _sdpa(q, k, v, mask)
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))
    out = varlen_attn(
        q, k, v, mask.cu_seqlens, mask.cu_seqlens, T, T, window_size=(-1, 0), enable_gqa=H != k.shape[1]
    )  # (B*T, H, D), causal inside each document; the padding's empty documents cost nothing
    return out.reshape(B, T, H, D).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Causal, document-local attention: q (B, H, T, D), k/v (B, KV, T, D) -> (B, H, T, D), scale 1/sqrt(D)."""
    if mask.implementation == "sdpa":
        return _sdpa(q, k, v, mask)
    if mask.implementation == "flex_attention":
        return _flex(q, k, v, mask)
    if mask.implementation == "flash_attention_2":
        return _flash(q, k, v, mask)
    if mask.implementation == "varlen":
        return _varlen(q, k, v, mask)
    return _eager(q, k, v, mask)
