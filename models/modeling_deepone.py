"""DeepOneForCausalLM: the deepone family as a Hugging Face causal LM, with a KV cache for `generate`.

NOTE: this file and configuration_deepone.py are copied verbatim into every deepone export, and `config.json` points
at them through `auto_map`, so an exported folder loads on a machine without this repository:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("output_models/run/final", trust_remote_code=True)

Inside the repository `import models` registers the same classes, so no remote code is needed there. Hence the rules
for this file: import only torch, transformers and the standard library; work with transformers 4.x (the cache is
passed as `past_key_values`) and 5.x (passed as `cache`).

Training uses models.Transformer (models/model.py); this is an inference twin of its deepone path with the same
parameter names, so the export is a plain rename-free copy of its weights (`model.<Transformer key>`). The math is
the same: RMSNorm in fp32, RoPE tables in fp32 (rotate_half layout), GQA, DeepNet post-norm blocks
`x = norm(alpha * x + f(x))` with alpha = (2N)^(1/4), no final norm. tests/test_models_hf.py compares the two.

Attention masks follow the Hugging Face convention (1 = token, 0 = padding, shape (B, past + T)); positions count
only real tokens, so a left-padded row computes exactly what the same row computes unpadded.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_deepone import DeepOneConfig

_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}
# transformers 5 names the cache `cache` in model outputs and inputs; 4.x names it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DeepOneRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin (B, T, D), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D); cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class DeepOneAttention(nn.Module):
    def __init__(self, config: DeepOneConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        c = config.hidden_size
        self.q_proj = nn.Linear(c, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c, bias=False)
        self.q_norm = DeepOneRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = DeepOneRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """x (B, T, C); mask None = plain causal over x alone, else boolean (B, 1, T, past + T)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KV, past + T, D)
        n_rep = self.num_heads // self.num_kv_heads
        if n_rep > 1:  # query head h reads kv head h // n_rep
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class DeepOneMLP(nn.Module):
    def __init__(self, config: DeepOneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DeepOneBlock(nn.Module):
    """DeepNet post-norm: x = attn_norm(alpha * x + attn(x)); x = mlp_norm(alpha * x + mlp(x))."""

    def __init__(self, config: DeepOneConfig, layer_idx: int):
        super().__init__()
        self.alpha = (2 * config.num_hidden_layers) ** 0.25
        self.attn_norm = DeepOneRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DeepOneAttention(config, layer_idx)
        self.mlp_norm = DeepOneRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DeepOneMLP(config)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        x = self.attn_norm(self.alpha * x + self.self_attn(x, cos, sin, mask, cache))
        return self.mlp_norm(self.alpha * x + self.mlp(x))


class DeepOneModel(nn.Module):
    """Embedding and blocks; a post-norm block already ends in a norm, so there is no final norm."""

    def __init__(self, config: DeepOneConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepOneBlock(config, i) for i in range(config.num_hidden_layers))


def _positions_and_mask(attention_mask: torch.Tensor | None, past: int, T: int, device):
    """Positions (B or 1, T) of the new tokens and the boolean mask (B, 1, T, past + T), or None for plain causal.

    Positions count real tokens only (left padding does not shift them); a key is visible when it is not in the
    future and not padding. A padding query still sees itself, so no softmax row is empty.
    """
    if attention_mask is None:
        attention_mask = torch.ones(1, past + T, dtype=torch.long, device=device)
    if attention_mask.dim() != 2 or attention_mask.shape[1] != past + T:
        raise ValueError(
            f"attention_mask must be (batch, {past + T}) with 1 for tokens and 0 for padding, "
            f"got {tuple(attention_mask.shape)}"
        )
    valid = attention_mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B or 1, T)
    if past == 0 and bool(valid.all()):
        return positions, None
    query = torch.arange(past, past + T, device=device)[:, None]  # absolute index of each new token
    key = torch.arange(past + T, device=device)[None, :]
    mask = (key <= query)[None] & valid[:, None, :]  # (B, T, past + T)
    mask |= key == query  # a token always sees itself
    return positions, mask[:, None]


class DeepOnePreTrainedModel(PreTrainedModel):
    config_class = DeepOneConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DeepOneBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # NOTE: a plain normal init, for `from_config` only; pretraining uses models.Transformer's DeepNet init.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, DeepOneRMSNorm):
            module.weight.fill_(1.0)


class DeepOneForCausalLM(DeepOnePreTrainedModel, GenerationMixin):
    def __init__(self, config: DeepOneConfig):
        super().__init__(config)
        self.model = DeepOneModel(config)
        # A tied head reads the embedding matrix directly (no lm_head weight), as models.Transformer does.
        untied = not config.tie_word_embeddings
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if untied else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V) in fp32.

        labels follow the Hugging Face convention (not shifted: labels[t] is token t; -100 = ignored).
        cache / past_key_values: a transformers Cache (DynamicCache); created when use_cache is true and none given.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        positions, mask = _positions_and_mask(attention_mask, past, T, input_ids.device)
        if position_ids is not None:
            positions = position_ids
        hidden = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = _rope_cos_sin(positions.expand(B, T), self.config.head_dim, self.config.rope_theta, hidden.dtype)
        for block in self.model.layers:
            hidden = block(hidden, cos, sin, mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, head).float()  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
