"""The model zoo: one decoder implementation (llama, qwen3, deepone), named configs, HF export/import, pipeline.

Importing this package registers the deepone classes with transformers' AutoConfig / AutoModelForCausalLM, so
`AutoModelForCausalLM.from_pretrained(folder)` loads an exported deepone model without trust_remote_code; outside the
repository the export's own copy of the same code loads with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .attention import ATTN_IMPLEMENTATIONS, check_attn_implementation, varlen_offsets
from .card import RunSummary
from .compile import CompileWatch, compiled_graphs
from .config import ModelConfig, available_configs, count_parameters, describe, load_model_config
from .configuration_deepone import DeepOneConfig
from .hf import export_hf, load_hf
from .loss import chunked_cross_entropy, memory_chunk_size
from .model import Transformer
from .modeling_deepone import DeepOneForCausalLM
from .pipeline import (
    from_pipeline_state_dict,
    load_pipeline_state,
    per_token_losses,
    pipeline_layers,
    pipeline_loss,
    to_pipeline_state_dict,
)

AutoConfig.register("deepone", DeepOneConfig, exist_ok=True)
AutoModelForCausalLM.register(DeepOneConfig, DeepOneForCausalLM, exist_ok=True)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "CompileWatch",
    "DeepOneConfig",
    "DeepOneForCausalLM",
    "ModelConfig",
    "RunSummary",
    "Transformer",
    "available_configs",
    "check_attn_implementation",
    "varlen_offsets",
    "chunked_cross_entropy",
    "memory_chunk_size",
    "compiled_graphs",
    "count_parameters",
    "describe",
    "export_hf",
    "from_pipeline_state_dict",
    "load_hf",
    "load_model_config",
    "load_pipeline_state",
    "per_token_losses",
    "pipeline_layers",
    "pipeline_loss",
    "to_pipeline_state_dict",
]
