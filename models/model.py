"""One decoder-only transformer for the llama, qwen3 and deepone families (see models/config.py).

Shapes: B batch, T sequence, C hidden_size, H query heads, KV key/value heads, D head_dim, V vocab_size.

The math follows Hugging Face's LlamaForCausalLM / Qwen3ForCausalLM line for line (RMSNorm in fp32, RoPE with the
rotate_half layout, GQA with query head h reading kv head h // (H / KV)), so weights export 1:1 and logits match.

Packed rows: `position_ids` restart at every document and `doc_ids` number the documents of a row; attention never
crosses documents (models/attention.py), so a packed row computes exactly what its documents would compute alone.

Structure kept pipeline-ready: `embed_tokens` -> `layers` (blocks) -> `norm` -> `lm_head` (None when tied), and each
block is called as `block(hidden, position_ids, doc_ids) -> hidden` with tensors only (models/pipeline.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import AttentionMask, attend, build_attention_mask, check_attn_implementation
from .config import ModelConfig
from .loss import chunked_cross_entropy

_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---- rotary position embeddings ----


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin of shape (B, T, D), computed in fp32 then cast to `dtype`.

    NOTE: computed on the fly rather than stored as a buffer: a buffer would be cast to bf16 with the model and
    would need special care on the meta device; this is B*T*D/2 multiplies per forward, shared by all layers.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): rotate_half layout pairs dim i with dim i + D/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D); cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# ---- blocks ----


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # Qwen3-style QK-norm: one RMSNorm over head_dim, shared by all heads, applied before RoPE.
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Gated linear unit: down(act(gate(x)) * up(x)); act = silu gives SwiGLU, relu gives a ReLU-gated GLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer.

    pre-norm (llama, qwen3):  x = x + attn(attn_norm(x));          x = x + mlp(mlp_norm(x))
    post-norm (deepone):      x = attn_norm(alpha * x + attn(x));  x = mlp_norm(alpha * x + mlp(x))   (DeepNet)

    `attn_norm` / `mlp_norm` are Hugging Face's `input_layernorm` / `post_attention_layernorm` in the pre-norm case.

    With `activation_checkpointing`, a training forward keeps only the block's inputs and recomputes the rest during
    the backward pass (non-reentrant torch.utils.checkpoint): every layout (one process, DDP, FSDP, the pipeline
    layer list) gets it from here.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        attn_implementation: str = "sdpa",
        activation_checkpointing: bool = False,
        inputs: BlockInputs | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.inputs = inputs or BlockInputs()  # shared by the blocks of one model or layer list
        self.activation_checkpointing = activation_checkpointing
        self.attn_implementation = attn_implementation
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.post_norm = cfg.post_norm
        self.alpha = cfg.deepnet_alpha if cfg.post_norm else 1.0
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, C), position_ids (B, T), doc_ids (B, T) or None -> (B, T, C).

        `rope` and `attn_mask` are what Transformer.forward computes once for all layers; when absent (pipeline
        stages) they are rebuilt from the tensors, reusing the previous layer's when the tensors are the same.
        """
        if rope is None:
            rope = self.inputs.rope(position_ids, self.head_dim, self.rope_theta, hidden.dtype)
        if attn_mask is None:
            attn_mask = self.inputs.mask(self.attn_implementation, doc_ids, hidden)
        if self.activation_checkpointing and torch.is_grad_enabled():
            # NOTE: non-reentrant: works with FSDP2's hooks, DDP, keyword arguments and inputs without gradients.
            return checkpoint(self._layer, hidden, rope, attn_mask, use_reentrant=False)
        return self._layer(hidden, rope, attn_mask)

    def _layer(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_mask: AttentionMask):
        cos, sin = rope
        if self.post_norm:
            hidden = self.attn_norm(self.alpha * hidden + self.self_attn(hidden, cos, sin, attn_mask))
            return self.mlp_norm(self.alpha * hidden + self.mlp(hidden))
        hidden = hidden + self.self_attn(self.attn_norm(hidden), cos, sin, attn_mask)
        return hidden + self.mlp(self.mlp_norm(hidden))


class BlockInputs:
    """What a tensor-only block call rebuilds from its tensors (rope tables, attention mask), kept for the last
    tensors seen: consecutive blocks of a pipeline stage receive the very same position_ids / doc_ids objects, so
    the blocks that share one of these build them once per stage and micro-batch."""

    def __init__(self) -> None:
        self._rope: list = [None, None, None]  # [position_ids, key, (cos, sin)]
        self._mask: list = [None, None, None]  # [doc_ids, key, mask]

    def rope(self, position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
        key = (head_dim, theta, dtype, torch.is_grad_enabled())
        if self._rope[0] is not position_ids or self._rope[1] != key:
            self._rope = [position_ids, key, rope_cos_sin(position_ids, head_dim, theta, dtype)]
        return self._rope[2]

    def mask(self, implementation: str, doc_ids: torch.Tensor | None, hidden: torch.Tensor) -> AttentionMask:
        B, T, _ = hidden.shape
        key = (implementation, B, T, hidden.device, torch.is_grad_enabled())
        if doc_ids is None or self._mask[0] is not doc_ids or self._mask[1] != key:
            self._mask = [doc_ids, key, build_attention_mask(implementation, doc_ids, B, T, hidden.device)]
        return self._mask[2]


# ---- the model ----


class Transformer(nn.Module):
    """Decoder-only language model.

    Build cheaply with `with torch.device("meta"): Transformer(cfg)`, then `.to_empty(device=...)` and
    `init_weights()`. The caller seeds torch's RNG; init_weights draws from it in a fixed module order.
    """

    def __init__(self, cfg: ModelConfig, attn_implementation: str = "sdpa", activation_checkpointing: bool = False):
        super().__init__()
        check_attn_implementation(attn_implementation)
        self.cfg = cfg
        self.attn_implementation = attn_implementation
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, attn_implementation, activation_checkpointing) for i in range(cfg.num_hidden_layers)
        )
        # NOTE: a post-norm block already ends in a norm, so deepone has no separate final norm (as in DeepNet).
        self.norm = nn.Identity() if cfg.post_norm else RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.loss_chunk_size: int | None = None  # tokens per chunk of the head + loss; None = automatic
        self.compiled_forward = None  # set by compile_loss_path

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, C) output projection: the embedding matrix when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """llama/qwen3: every matrix ~ N(0, initializer_range) as Hugging Face does; norms = 1.

        deepone: DeepNet init: Xavier-normal with gain beta = (8N)^(-1/4) on the feed-forward, value and output
        projections, gain 1 on query and key; embeddings and the head ~ N(0, initializer_range).
        """
        cfg = self.cfg
        std = cfg.initializer_range
        self.embed_tokens.weight.normal_(0.0, std)
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            for norm in (block.attn_norm, block.mlp_norm, attn.q_norm, attn.k_norm):
                if norm is not None:
                    norm.weight.fill_(1.0)
            if cfg.post_norm:
                beta = cfg.deepnet_beta
                nn.init.xavier_normal_(attn.q_proj.weight, gain=1.0)
                nn.init.xavier_normal_(attn.k_proj.weight, gain=1.0)
                for linear in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    nn.init.xavier_normal_(linear.weight, gain=beta)
            else:
                for linear in (
                    attn.q_proj,
                    attn.k_proj,
                    attn.v_proj,
                    attn.o_proj,
                    mlp.gate_proj,
                    mlp.up_proj,
                    mlp.down_proj,
                ):
                    linear.weight.normal_(0.0, std)
        if isinstance(self.norm, RMSNorm):
            self.norm.weight.fill_(1.0)
        if self.lm_head is not None:
            self.lm_head.weight.normal_(0.0, std)

    def compile_loss_path(self, **options) -> None:
        """torch.compile the loss path whole: embedding, every block, the final norm, the head and the chunked loss.

        Only the loss path (`labels` given: training and evaluation) runs compiled; the logits path (text samples,
        generation at every length) stays eager, so it never recompiles. The attention mask is built eagerly before
        the graph, always in the same form (`build_attention_mask(same_form=True)`), so batches with other document
        layouts reuse the same graph; shapes are static (`dynamic=False`): training and evaluation batches share one
        (B, T). Compiling the whole path rather than each block lets the compiler fuse the head and the loss too
        (measured against per-block compiling in docs/results.md, Throughput).
        """
        options = {"dynamic": False, "fullgraph": True} | options
        self.compiled_forward = torch.compile(self._forward, **options)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items: int | float | torch.Tensor | None = None,
        reduction: str = "mean",
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) in fp32, or with `labels` (B, T) the scalar mean loss.

        position_ids: None = 0..T-1 in every row. doc_ids: None = one document per row.
        labels are already shifted (labels[b, t] is the target of position t); -100 = no target.
        num_items: optional divisor of the summed loss instead of this batch's label count (see chunked_cross_entropy).
        reduction: "none" returns each position's nats (B, T) instead of the mean (evaluation).
        cu_seqlens: the varlen backend's padded document offsets, built on the host (attention.varlen_offsets).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        compiled = self.compiled_forward is not None and labels is not None
        attn_mask = build_attention_mask(
            self.attn_implementation, doc_ids, B, T, input_ids.device, same_form=compiled, cu_seqlens=cu_seqlens
        )
        if not compiled:
            return self._forward(input_ids, position_ids, attn_mask, labels, num_items, reduction)
        if num_items is not None:  # a tensor, so that another divisor does not recompile the graph
            num_items = torch.as_tensor(num_items, dtype=torch.float32, device=input_ids.device)
        return self.compiled_forward(input_ids, position_ids, attn_mask, labels, num_items, reduction)

    def _forward(self, input_ids, position_ids, attn_mask, labels, num_items, reduction) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (B, T, C)
        rope = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, hidden.dtype)
        for block in self.layers:
            hidden = block(hidden, position_ids, rope=rope, attn_mask=attn_mask)
        hidden = self.norm(hidden)
        if labels is None:
            return F.linear(hidden, self.head_weight).float()
        return chunked_cross_entropy(hidden, self.head_weight, labels, num_items, self.loss_chunk_size, reduction)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
