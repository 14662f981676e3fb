"""Model configuration: one dataclass, named sizes in models/configs/*.json, and arithmetic parameter/FLOP counts.

Field names follow Hugging Face (`vocab_size`, `hidden_size`, ...) so a config maps 1:1 onto `LlamaConfig` /
`Qwen3Config` at export time. Three families share one decoder implementation (models/model.py):

- "llama":   pre-norm, SwiGLU, RoPE, GQA; exports to `LlamaForCausalLM`.
- "qwen3":   llama plus per-head RMSNorm on queries and keys before RoPE; exports to `Qwen3ForCausalLM`.
- "deepone": DeepNet post-norm (`x = norm(alpha * x + f(x))`) with DeepNet init, RoPE and QK-norm; exports to our
             own `DeepOneForCausalLM` (models/modeling_deepone.py, copied into the export).

NOTE: Llama-3 "rope scaling" (rope_type "llama3") is deliberately absent: it only matters when extending a model
pretrained at a short context, and these models are pretrained from scratch at their training length.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FAMILIES = ("llama", "qwen3", "deepone")
ACTIVATIONS = ("silu", "relu", "gelu")
# Declared type and inclusive range of each ModelConfig field; None-able fields are resolved in __post_init__.
FIELD_TYPES = {
    "family": str,
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "max_position_embeddings": int,
    "rope_theta": float,
    "rms_norm_eps": float,
    "tie_word_embeddings": bool,
    "hidden_act": str,
    "qk_norm": bool,
    "initializer_range": float,
}
OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim")
_INT_MAX = 2**31 - 1  # sizes beyond this overflow int32 index math long before they could fit in memory
FIELD_RANGES = {
    "vocab_size": (1, _INT_MAX),
    "hidden_size": (1, _INT_MAX),
    "intermediate_size": (1, _INT_MAX),
    "num_hidden_layers": (1, 100_000),
    "num_attention_heads": (1, _INT_MAX),
    "num_key_value_heads": (1, _INT_MAX),
    "head_dim": (2, _INT_MAX),
    "max_position_embeddings": (1, 2**40),
    "rope_theta": (0.0, None),  # floats with a lower bound of 0 must exceed it (see _check_fields)
    "rms_norm_eps": (0.0, 1.0),
    "initializer_range": (0.0, 10.0),
}
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


@dataclass(kw_only=True)
class ModelConfig:
    """Shape and flavour of one decoder-only transformer."""

    family: str = "llama"  # "llama" | "qwen3" | "deepone" (see module docstring)
    vocab_size: int = 32000  # rows of the embedding; follows the tokenizer (load_model_config overrides it)
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the GLU feed-forward (gate and up projections)
    num_hidden_layers: int  # number of decoder blocks (N in the DeepNet formulas)
    num_attention_heads: int  # query heads
    num_key_value_heads: int | None = None  # key/value heads for grouped-query attention; None = num_attention_heads
    head_dim: int | None = None  # width of one head; None = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096  # longest sequence the model is meant for (RoPE itself has no table)
    rope_theta: float = 10000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    tie_word_embeddings: bool = True  # the output head reuses the input embedding matrix
    hidden_act: str = "silu"  # GLU activation: "silu" = SwiGLU, "relu" = ReLU-gated GLU, "gelu" = GeGLU
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (qwen3 always, deepone by choice)
    initializer_range: float = 0.02  # std of the normal init of embeddings and (llama/qwen3) linear weights

    def __post_init__(self) -> None:
        self._check_fields()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is unknown; use one of {', '.join(FAMILIES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is unsupported; use one of {', '.join(ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.family == "llama" and self.qk_norm:
            raise ValueError("the llama family has no QK-norm; use family 'qwen3' (or 'deepone') for qk_norm=true")
        if self.family == "qwen3" and not self.qk_norm:
            raise ValueError("the qwen3 family always uses QK-norm; set qk_norm=true or use family 'llama'")

    def _check_fields(self) -> None:
        """Every field against its declared type and range (FIELD_RANGES), naming the field: a JSON file may hold
        "128" or 128.0 where an integer belongs, or "yes" where a bool does."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), FIELD_TYPES[f.name]
            if value is None and f.name in OPTIONAL_FIELDS:
                continue
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ValueError(
                    f"model config field {f.name} must be {_KIND_NAMES[kind]}, got {value!r} ({type(value).__name__})"
                )
            low, high = FIELD_RANGES.get(f.name, (None, None))
            strict = kind is float and low == 0 and f.name != "initializer_range"
            if low is None or (low < value if strict else low <= value) and (high is None or value <= high):
                continue
            bound = (">" if strict else ">=") + f" {low:,}" + ("" if high is None else f" and <= {high:,}")
            raise ValueError(f"model config field {f.name} must be {bound}, got {value!r}")

    # ---- DeepNet (family "deepone") ----
    @property
    def post_norm(self) -> bool:
        """DeepNet post-norm residual `x = norm(alpha * x + f(x))` instead of pre-norm `x = x + f(norm(x))`."""
        return self.family == "deepone"

    @property
    def deepnet_alpha(self) -> float:
        """Residual scale of DeepNet's decoder-only form: (2N)^(1/4)."""
        return (2 * self.num_hidden_layers) ** 0.25

    @property
    def deepnet_beta(self) -> float:
        """Xavier-normal gain of DeepNet's decoder-only form: (8N)^(-1/4), on feed-forward, value and output."""
        return (8 * self.num_hidden_layers) ** -0.25

    # ---- (de)serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown model config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except TypeError as e:  # a required field is missing
            raise ValueError(f"incomplete model config: {e}") from None


def available_configs() -> list[str]:
    """Names accepted by load_model_config (the files in models/configs/)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str, vocab_size: int | None = None) -> ModelConfig:
    """Load a named config (`models/configs/<name>.json`) or a user's JSON file; `vocab_size` overrides the file's.

    The vocabulary size belongs to the tokenizer, so callers pass `len(tokenizer)` here.
    """
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"model config file {name_or_path} does not exist")
    else:
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(
                f"unknown model config {name_or_path!r}; choose one of {', '.join(available_configs())} "
                f"or pass the path of a .json file"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} must hold a JSON object")
    if vocab_size is not None:
        data["vocab_size"] = int(vocab_size)
    try:
        return ModelConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# NOTE: the counts below read only Hugging Face field names, so they also take a transformers config, where
# `head_dim` and `num_key_value_heads` may be missing or None (= hidden_size // heads and = heads).
def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _layer_matmul_params(cfg) -> tuple[int, int]:
    """(attention, gated MLP) weights of one decoder block: q, k, v, o and gate, up, down."""
    c, hd = cfg.hidden_size, _head_dim(cfg)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    q_width, kv_width = cfg.num_attention_heads * hd, kv_heads * hd
    attn = c * q_width + 2 * c * kv_width + q_width * c
    mlp = 3 * c * cfg.intermediate_size
    return attn, mlp


def matmul_params(cfg) -> int:
    """Weights multiplied per token in a forward pass: every linear layer of every block plus the LM head.

    The head counts even when it is tied to the embedding, because the head matmul is computed either way; norms
    and the embedding lookup are not matmuls and are left out. Accepts a ModelConfig or a transformers config.
    """
    attn, mlp = _layer_matmul_params(cfg)
    return cfg.num_hidden_layers * (attn + mlp) + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg, context_len: float) -> float:
    """Training (forward + backward) model FLOPs per token, PaLM appendix B convention.

    - 6 FLOPs per matmul weight (`matmul_params`) per token: 2 forward, 4 backward.
    - Attention scores: per layer QK^T and AV cost 2 x 2 x heads x head_dim FLOPs per attended key forward, x3 for
      forward + backward, i.e. 12 x layers x heads x head_dim x context_len per token.

    `context_len` is the mean number of keys a query actually attends to under the causal document mask
    (monitor.mfu.mean_attended_context), not the sequence length: packed short documents make attention much
    cheaper than T^2 / 2. Recomputation (activation checkpointing) is overhead, not model work, and is not counted.
    Accepts a ModelConfig or a transformers config.
    """
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * _head_dim(cfg) * context_len
    return 6 * matmul_params(cfg) + attention


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts computed from the config alone (no module is built).

    Returns:
        total: every trainable parameter (a tied head counts once).
        embedding: the token embedding matrix (vocab_size x hidden_size).
        lm_head: the separate output matrix, 0 when tied.
        non_embedding: total - embedding - lm_head (the usual "model size" in scaling-law papers).
        matmul: `matmul_params(cfg)`, the weights multiplied per token (the head counts even when tied).
    """
    c, hd = cfg.hidden_size, cfg.head_dim
    attn, mlp = _layer_matmul_params(cfg)
    norms = 2 * c + (2 * hd if cfg.qk_norm else 0)
    final_norm = 0 if cfg.post_norm else c  # post-norm blocks already end in a norm (see models/model.py)
    embedding = cfg.vocab_size * c
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * c
    blocks = cfg.num_hidden_layers * (attn + mlp + norms)
    total = embedding + blocks + final_norm + lm_head
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": lm_head,
        "non_embedding": total - embedding - lm_head,
        "matmul": matmul_params(cfg),
    }


def describe(cfg: ModelConfig) -> str:
    """One line for logs: family, shape and parameter counts in millions."""
    n = count_parameters(cfg)
    return (
        f"{cfg.family} {cfg.num_hidden_layers}L x {cfg.hidden_size}d, {cfg.num_attention_heads}q/"
        f"{cfg.num_key_value_heads}kv heads x {cfg.head_dim}, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}: "
        f"{n['total'] / 1e6:.1f}M params ({n['non_embedding'] / 1e6:.1f}M non-embedding)"
    )
