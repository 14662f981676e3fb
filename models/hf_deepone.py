"""Hugging Face classes for the deepone family, so exported folders load with the Auto classes.

`import models` registers them:

    import models  # noqa: F401  (registers model_type "deepone" with AutoConfig / AutoModelForCausalLM)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("output_models/run/final")

No `trust_remote_code` is involved: the code is this file, imported from this repository. llama and qwen3 exports
use transformers' own classes and need no import at all.

The wrapped module is our Transformer (attribute `model`), so the safetensors keys are `model.<Transformer key>`.
Generation works without a KV cache (each step re-runs the prefix), which is fine for evaluation samples.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import ATTN_IMPLEMENTATIONS
from .config import ModelConfig
from .model import Transformer


class DeepOneConfig(PretrainedConfig):
    """The deepone fields of ModelConfig in Hugging Face form (see ModelConfig for their meaning)."""

    model_type = "deepone"

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qk_norm: bool = True
    initializer_range: float = 0.02
    use_cache: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(
            family="deepone",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
            qk_norm=self.qk_norm,
            initializer_range=self.initializer_range,
        )


def _segments_from_attention_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) 1 = token, 0 = padding -> doc_ids, position_ids that isolate padding runs as their own documents.

    With left padding [0, 0, 1, 1, 1] the real tokens become document 1 at positions 0, 1, 2, exactly as if the
    padding were absent.
    """
    changes = torch.zeros_like(attention_mask, dtype=torch.long)
    changes[:, 1:] = (attention_mask[:, 1:] != attention_mask[:, :-1]).long()
    doc_ids = changes.cumsum(-1)  # (B, T)
    T = attention_mask.shape[1]
    index = torch.arange(T, device=attention_mask.device).expand_as(doc_ids)
    start = torch.where(changes.bool() | (index == 0), index, 0).cummax(-1).values  # index where each run starts
    return doc_ids, index - start


class DeepOneForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DeepOneConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: DeepOneConfig):
        super().__init__(config)
        attn = getattr(config, "_attn_implementation", None)
        self.model = Transformer(config.to_model_config(), attn if attn in ATTN_IMPLEMENTATIONS else "sdpa")
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is self:
            self.model.init_weights()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Hugging Face conventions: `labels` are not shifted (labels[t] is token t); attention_mask 0 = padding."""
        doc_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            doc_ids, position_ids = _segments_from_attention_mask(attention_mask)
        logits = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        loss = None
        if labels is not None:
            shifted = torch.full_like(labels, -100)
            shifted[:, :-1] = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
