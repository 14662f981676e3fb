"""Export to and import from Hugging Face folders (config.json + model.safetensors + tokenizer files + model card).

llama -> LlamaForCausalLM, qwen3 -> Qwen3ForCausalLM: stock transformers classes, loadable anywhere with
`AutoModelForCausalLM.from_pretrained(folder)`. deepone -> DeepOneForCausalLM (models/modeling_deepone.py), whose code
is copied into the folder: `from_pretrained(folder, trust_remote_code=True)` anywhere, or plain after `import models`.
Weights are written and read with safetensors only (no pickle). `export_hf` is the one writer: train.py's `final/`
and `python export.py CHECKPOINT OUT` both call it.

Key mapping (llama/qwen3): our `<key>` -> `model.<key>` with `attn_norm` -> `input_layernorm` and `mlp_norm` ->
`post_attention_layernorm`; `lm_head.weight` keeps its name and is omitted when tied. deepone: `model.<key>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import configuration_deepone, modeling_deepone
from .card import RunSummary, model_card
from .config import ModelConfig
from .configuration_deepone import DeepOneConfig
from .model import Transformer

_HF_NORM_NAMES = {".attn_norm.": ".input_layernorm.", ".mlp_norm.": ".post_attention_layernorm."}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "deepone": "DeepOneForCausalLM"}
_AUTO_MAP = {
    "AutoConfig": "configuration_deepone.DeepOneConfig",
    "AutoModelForCausalLM": "modeling_deepone.DeepOneForCausalLM",
}


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Transformer.state_dict() -> Hugging Face parameter names (contiguous CPU tensors, no shared storage)."""
    out = {}
    for name, tensor in state_dict.items():
        if name != "lm_head.weight":
            name = "model." + name
            if cfg.family != "deepone":
                for ours, theirs in _HF_NORM_NAMES.items():
                    name = name.replace(ours, theirs)
        out[name] = tensor.detach().to("cpu").contiguous().clone()
    return out


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict; drops a redundant `lm_head.weight` of tied models and rotary buffers."""
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = tensor
            continue
        if "rotary_emb" in name:
            continue
        name = name.removeprefix("model.")
        if cfg.family != "deepone":
            for ours, theirs in _HF_NORM_NAMES.items():
                name = name.replace(theirs, ours)
        out[name] = tensor
    return out


def hf_config(
    cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None
):
    """The transformers config object matching `cfg` (LlamaConfig, Qwen3Config or DeepOneConfig)."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act=cfg.hidden_act,
        initializer_range=cfg.initializer_range,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        architectures=[_ARCHITECTURES[cfg.family]],
    )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.family == "llama":
        from transformers import LlamaConfig

        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("LlamaConfig requires hidden_size divisible by num_attention_heads; use family 'qwen3'")
        return LlamaConfig(**common, rope_parameters=rope, attention_bias=False, mlp_bias=False)
    if cfg.family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, rope_parameters=rope, attention_bias=False, use_sliding_window=False)
    return DeepOneConfig(**common, rope_theta=cfg.rope_theta, qk_norm=cfg.qk_norm)


def _token_id(tokenizer, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    return value if isinstance(value, int) else None


def export_tokenizer(tokenizer, bos_token_id: int, eos_token_id: int, max_length: int | None):
    """A copy of the run's tokenizer that behaves as training did, for `AutoTokenizer.from_pretrained(export)`.

    - a post-processor puts BOS before every text (training packs `[BOS] doc [EOS]`), so `tokenizer(text)` gives
      the ids the model was trained on; a pair of texts is one document (`[BOS] a b`);
    - EOS doubles as the pad token (there is no separate one in the vocabulary); padding is on the left, which
      `generate` needs for batches of prompts;
    - `model_max_length` is the trained sequence length;
    - only input_ids and attention_mask are returned (no token_type_ids, which causal LMs do not take).
    The caller's tokenizer is not modified.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    backend = Tokenizer.from_str(backend.to_str())
    bos, eos = backend.id_to_token(bos_token_id), backend.id_to_token(eos_token_id)
    add_bos = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, bos_token_id)]
    )
    # A byte-level tokenizer's own post-processor only fixes character offsets: keep it, then add BOS.
    existing = backend.post_processor
    keep = isinstance(existing, processors.ByteLevel)
    backend.post_processor = processors.Sequence([existing, add_bos]) if keep else add_bos
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        padding_side="left",
        model_max_length=max_length if max_length is not None else int(1e30),
        model_input_names=["input_ids", "attention_mask"],
    )


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def current_umask() -> int:
    """The process's file-creation mask, read without changing it (Linux), else by setting and restoring it."""
    with contextlib.suppress(OSError):
        if found := re.search(r"^Umask:\s+([0-7]+)", Path("/proc/self/status").read_text(), flags=re.M):
            return int(found.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_weights(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, then the permissions every other file a run writes gets from the umask: safetensors
    creates its files 0600, which another user or a serving daemon cannot read."""
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, 0o666 & ~current_umask())


def export_hf(
    model: Transformer | dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer=None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    *,
    max_length: int | None = None,
    summary: RunSummary | None = None,
) -> Path:
    """Write `out_dir` as a self-contained Hugging Face model folder; the one export of `train.py` and export.py.

    Contents: config.json, model.safetensors, generation_config.json (EOS stops generation), the tokenizer as
    `export_tokenizer` makes it, README.md (the model card, models/card.py) and, for deepone, configuration_deepone.py
    and modeling_deepone.py with `auto_map` in config.json. config.json of llama/qwen3 carries `rope_theta` beside
    `rope_parameters`, so transformers 4.x (which reads only the former) and 5.x read the same model.

    The files are written straight into `out_dir`; callers that replace an earlier export write through
    `lifecycle.outdir.publish_dir`, which swaps the complete folder into place (train.py, export.py).

    Args:
        model: our Transformer, or its state dict (tensors by Transformer name, e.g. from a checkpoint).
        tokenizer: a `tokenizers.Tokenizer` or a `transformers.PreTrainedTokenizerFast` (whose declared BOS/EOS are
            used when the ids are not given, as data.load_tokenizer declares them).
        bos_token_id, eos_token_id: written into config.json and generation_config.json.
        dtype: cast the weights (e.g. torch.bfloat16) before saving; default keeps the model's dtype.
        max_length: the trained sequence length (the tokenizer's `model_max_length`, and config.json's
            `max_position_embeddings` when shorter than the model's).
        summary: what the run trained on, for the model card.
    """
    from transformers import GenerationConfig

    if isinstance(model, torch.nn.Module):
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd model prefixes its keys with "_orig_mod."
        model = model.state_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad_token_id = None
    if tokenizer is not None:
        bos_token_id = bos_token_id if bos_token_id is not None else _token_id(tokenizer, "bos_token_id")
        eos_token_id = eos_token_id if eos_token_id is not None else _token_id(tokenizer, "eos_token_id")
        if bos_token_id is None or eos_token_id is None:
            raise ValueError("the tokenizer declares no BOS/EOS token; pass bos_token_id and eos_token_id")
        exported = export_tokenizer(tokenizer, bos_token_id, eos_token_id, max_length)
        if len(exported) > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(exported)} tokens but the model only {cfg.vocab_size}")
        exported.save_pretrained(out)
        pad_token_id = eos_token_id
        # NOTE: transformers 5 records its internal class name, which 4.x cannot load; both load this one.
        _edit_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")

    if max_length is not None and max_length < cfg.max_position_embeddings:
        # The context the model was trained at is what tools read as its limit (lm-evaluation-harness and servers
        # take max_position_embeddings before the tokenizer's model_max_length); RoPE itself has no table.
        cfg = dataclasses.replace(cfg, max_position_embeddings=max_length)
    config = hf_config(cfg, bos_token_id, eos_token_id, pad_token_id)
    config.save_pretrained(out)
    if cfg.family == "deepone":
        for module in (configuration_deepone, modeling_deepone):
            shutil.copyfile(module.__file__, out / Path(module.__file__).name)
        _edit_json(out / "config.json", auto_map=_AUTO_MAP)
    else:
        _edit_json(out / "config.json", rope_theta=cfg.rope_theta)  # transformers 4.x reads only this one
    if bos_token_id is not None or eos_token_id is not None:
        generation = GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        generation.save_pretrained(out)

    tensors = to_hf_state_dict(model, cfg)
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    save_weights(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "README.md").write_text(
        model_card(cfg, summary, tokenizer_max_length=max_length, weights_dtype=next(iter(tensors.values())).dtype)
    )
    return out


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in _weight_files(folder):
        tensors.update(load_file(str(file)))
    return tensors


HF_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def model_config_from_hf(config: dict) -> ModelConfig:
    """A config.json dict of a llama / qwen3 / deepone model -> ModelConfig; unsupported features raise ValueError."""
    if not isinstance(config, dict):
        raise ValueError("config.json must hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen3", "deepone"):
        raise ValueError(f"model_type {model_type!r} is not supported; expected llama, qwen3 or deepone")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json rope_parameters must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"RoPE scaling {rope_type!r} is not implemented (pretraining uses plain RoPE); remove it from config.json"
        )
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config.get(flag):
            raise ValueError(f"config.json sets {flag}=true, which this model does not implement")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, int) and not isinstance(theta, bool):
        theta = float(theta)
    missing = [k for k in HF_REQUIRED_FIELDS if k not in config]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    fields = {
        "family": model_type,
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads"),  # None: ModelConfig resolves both defaults
        "head_dim": config.get("head_dim"),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "rope_theta": theta,
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "hidden_act": config.get("hidden_act", "silu"),
        "qk_norm": model_type == "qwen3" or (model_type == "deepone" and config.get("qk_norm", True)),
        "initializer_range": config.get("initializer_range", 0.02),
    }
    return ModelConfig(**fields)  # checks every field's type and range (ValueError naming the field)


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise ValueError(f"{folder} has no model.safetensors (or sharded index); only safetensors weights are loaded")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None


def check_hf_folder(path: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder, after checking what a load needs without reading any tensor data.

    Raises ValueError naming the file for: a missing or invalid config.json, a config field of the wrong type or
    range, missing weight files, a damaged or truncated safetensors file (its header must cover the file exactly),
    and weights whose names or shapes differ from what config.json describes.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        cfg = model_config_from_hf(json.loads(config_file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_file}: {e}") from None
    shapes = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), "pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except Exception as e:  # SafetensorError (damaged header, truncated data) or OSError (missing shard)
            raise ValueError(f"{file} is damaged or truncated ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    found = from_hf_state_dict(shapes, cfg)
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match config.json (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    wrong = [f"{name} {found[name]} (config.json: {shape})" for name, shape in expected.items() if found[name] != shape]
    if wrong:
        raise ValueError(f"{folder}: weight shapes do not match config.json: {', '.join(wrong[:3])}")
    return cfg


def load_hf(path: str | Path, attn_implementation: str = "sdpa") -> tuple[Transformer, ModelConfig]:
    """Load a Hugging Face folder (llama, qwen3 or deepone) into our Transformer, in fp32, on the CPU."""
    folder = Path(path)
    cfg = check_hf_folder(folder)
    state = from_hf_state_dict(_read_safetensors(folder), cfg)
    model = Transformer(cfg, attn_implementation)
    model.load_state_dict({name: t.float() for name, t in state.items()})
    return model, cfg
