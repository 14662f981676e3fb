"""The model card (README.md) written into every Hugging Face export: what was trained, on what, how to use it.

`RunSummary` holds the facts of a run that the weights do not: train.py fills it at the end of a run, and
`python export.py` fills it from a checkpoint's trainer_state.json (`RunSummary.from_trainer_state`), so the
card of a converted last checkpoint reads exactly as the run's own `final/` card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig, count_parameters

# The oldest transformers release an export was checked against (config, tokenizer, weights, generation).
OLDEST_TRANSFORMERS = "4.51"


@dataclass
class RunSummary:
    """What a run trained on and how far it got."""

    model_name: str  # --model or --model-config
    dataset: str  # the --dataset spec
    step: int  # optimizer steps taken
    tokens: int  # training tokens seen
    eval_loss: float | None  # held-out loss at the last evaluation, nats per token
    max_length: int  # --max-length, tokens per packed training row

    @classmethod
    def from_trainer_state(cls, state: dict) -> RunSummary:
        """From a checkpoint's trainer_state.json (written by lifecycle.state.RunState.save)."""
        args = state["args"]
        return cls(
            model_name=state["model_name"],
            dataset=args["dataset"],
            step=state["step"],
            tokens=state["tokens"],
            eval_loss=state.get("eval_loss"),
            max_length=args["max_length"],
        )


def _loading_code(cfg: ModelConfig) -> str:
    remote = ", trust_remote_code=True" if cfg.family == "deepone" else ""
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("PATH"{remote})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("PATH"{remote})\n'
        'inputs = tokenizer(["Once upon a time"], return_tensors="pt")  # starts with BOS, as in training\n'
        "out = model.generate(**inputs, max_new_tokens=40, do_sample=False)\n"
        "print(tokenizer.decode(out[0], skip_special_tokens=True))\n"
        "```\n"
    )


def model_card(
    cfg: ModelConfig,
    summary: RunSummary | None,
    *,
    tokenizer_max_length: int | None,
    weights_dtype: torch.dtype,
) -> str:
    """README.md of an export. Holds no time stamps or paths, so the same run always gives the same card."""
    n = count_parameters(cfg)
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "deepone": "DeepOneForCausalLM"}[cfg.family]
    title = summary.model_name if summary else cfg.family
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "---",
        "",
        f"# {title}",
        "",
        f"A {n['total'] / 1e6:.1f}M-parameter ({n['non_embedding'] / 1e6:.1f}M without embeddings) {cfg.family} "
        f"decoder language model: {cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value heads, vocabulary {cfg.vocab_size:,}, "
        f"weights in {str(weights_dtype).removeprefix('torch.')}.",
        "",
        "## Training",
        "",
    ]
    if summary is None:
        lines.append("Not recorded (exported from weights alone).")
    else:
        loss = summary.eval_loss
        loss_text = "not evaluated" if loss is None else f"{loss:.4f} nats per token"
        if loss is not None and math.isfinite(loss):
            loss_text += f" (perplexity {math.exp(loss):.2f})"
        lines += [
            "| | |",
            "|---|---|",
            f"| data (`--dataset`) | `{summary.dataset}` |",
            f"| tokens seen | {summary.tokens:,} |",
            f"| optimizer steps | {summary.step:,} |",
            f"| sequence length | {summary.max_length:,} tokens, documents packed as `[BOS] text [EOS]` |",
            f"| final held-out loss | {loss_text} |",
        ]
    remote = (
        "The model code (`configuration_deepone.py`, `modeling_deepone.py`) is part of this folder, so loading needs "
        "`trust_remote_code=True` and nothing else."
        if cfg.family == "deepone"
        else f"`{arch}` is a standard transformers class: no remote code."
    )
    max_len = tokenizer_max_length or cfg.max_position_embeddings
    harness_remote = ",trust_remote_code=True" if cfg.family == "deepone" else ""
    lines += [
        "",
        "## Load",
        "",
        f"{remote} Works with transformers {OLDEST_TRANSFORMERS} and newer (both 4.x and 5.x).",
        "",
        _loading_code(cfg),
        "The tokenizer behaves as in training: it puts BOS before every text, EOS is the pad token and stops "
        f"generation (generation_config.json), padding is on the left, and `model_max_length` is {max_len:,}, the "
        "trained length.",
        "",
        "## Evaluate",
        "",
        "With the training repository (held-out loss, perplexity and bits per byte on any dataset spec it accepts):",
        "",
        "```bash",
        "python eval.py PATH --dataset SPEC --json",
        "```",
        "",
        "With the lm-evaluation-harness (BOS added as in training, the trained length as the window):",
        "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained=PATH,add_bos_token=True,max_length={max_len}{harness_remote} "
        "--tasks hellaswag,arc_easy --batch_size 8",
        "```",
        "",
    ]
    return "\n".join(lines)
