"""The Transformer as a DeepSpeed PipelineModule layer list, and state-dict conversion to and from it.

Layer indices (DeepSpeed saves one file per index, `layer_XX-model_states.pt`):

    0          EmbeddingPipe   (input_ids, position_ids, doc_ids, labels) -> (hidden, position_ids, doc_ids, labels)
    1 .. N     BlockPipe       (hidden, position_ids, doc_ids, labels) -> same, one decoder block each
    N + 1      NormPipe        final norm (no parameters for deepone, whose post-norm blocks end in a norm)
    N + 2      head + loss     -> scalar summed loss (chunked cross-entropy); the engine's loss_fn, `pipeline_loss`,
                               divides it by the micro-batch's share of the global label count

Every stage boundary carries a tuple of tensors; integer tensors get no gradient. With tied embeddings the first
and last layers are `TiedLayerSpec("embed", EmbeddingPipe)`: DeepSpeed keeps one EmbeddingPipe per stage that uses
it, reduces the tied gradient across them and saves it once (layer 0); the head reads `embed_tokens.weight`.

Usage in a training script:

    layers = pipeline_layers(cfg, "flex_attention")
    pipe = PipelineModule(layers, num_stages=S, loss_fn=pipeline_loss, partition_method="type:BlockPipe")
    load_pipeline_state(pipe, reference_model.state_dict(), cfg)   # same init as the single-process model
    # batches: ((input_ids, position_ids, doc_ids, labels), (labels, num_items))
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .config import ModelConfig
from .loss import chunked_cross_entropy
from .model import Block, BlockInputs, RMSNorm

TIED_KEY = "embed"  # the TiedLayerSpec key; PipelineModule names its parameters "tied_modules.embed.<param>"


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.per_token_loss = False  # as the tied head: per-token nats instead of the sum (see per_token_losses)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, doc_ids, labels = inputs
        return self.embed_tokens(input_ids), position_ids, doc_ids, labels


class BlockPipe(Block):
    """A decoder block taking and returning the stage tuple; parameter names equal Block's."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, doc_ids, labels = inputs
        return super().forward(hidden, position_ids, doc_ids), position_ids, doc_ids, labels


class NormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.Identity() if cfg.post_norm else RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, doc_ids, labels = inputs
        return self.norm(hidden), position_ids, doc_ids, labels


class LMHeadPipe(nn.Module):
    """Untied output head fused with the loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.per_token_loss = False  # per-token nats instead of the sum (see per_token_losses)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden, _, _, labels = inputs
        reduction = "none" if self.per_token_loss else "mean"
        return chunked_cross_entropy(hidden, self.lm_head.weight, labels, num_items=1.0, reduction=reduction)


def tied_head_loss(embedding: EmbeddingPipe, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """forward_fn of the last TiedLayerSpec: the embedding matrix used as the output head, fused with the loss."""
    hidden, _, _, labels = inputs
    reduction = "none" if embedding.per_token_loss else "mean"
    return chunked_cross_entropy(hidden, embedding.embed_tokens.weight, labels, num_items=1.0, reduction=reduction)


@contextlib.contextmanager
def per_token_losses(module: nn.Module):
    """Within the block, the head layers of `module` (a PipelineModule) return each label's nats (B, T) instead of
    the summed loss, for `pipeline_loss` to compute bits per byte (evaluation only; no gradient flows)."""
    heads = [m for m in module.modules() if isinstance(m, EmbeddingPipe | LMHeadPipe)]
    for m in heads:
        m.per_token_loss = True
    try:
        yield
    finally:
        for m in heads:
            m.per_token_loss = False


def pipeline_loss(loss_sum: torch.Tensor, target: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """loss_fn of the PipelineModule: the summed loss over `num_items`, with target = (labels, num_items).

    With num_items = (labels of the whole global batch) / (micro-batches), DeepSpeed's mean over micro-batches
    gives sum / label count of the global batch: the loss one process computes over the same rows, as on DDP.

    Evaluation (inside `per_token_losses`): the head hands over per-token nats (B, T) and target = (labels,
    num_items, bytes per label); the result is [loss share, nats of the labels that stand for text, their bytes],
    for bits per byte.
    """
    if loss_sum.dim() == 0:
        return loss_sum / target[1]
    nats, num_bytes = loss_sum.double(), target[2].double()
    return torch.stack([nats.sum() / target[1], (nats * (num_bytes > 0)).sum(), num_bytes.sum()])


def pipeline_layers(
    cfg: ModelConfig, attn_implementation: str = "sdpa", activation_checkpointing: bool = False
) -> list:
    """LayerSpecs for deepspeed.pipe.PipelineModule: embedding, N blocks, final norm, head + loss.

    `activation_checkpointing` recomputes each block in the backward pass (see Block), on any pipeline engine.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # imported here: deepspeed is only needed for --pipeline

    if cfg.tie_word_embeddings:
        first = TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, tied_weight_attr="embed_tokens.weight")
        last = TiedLayerSpec(
            TIED_KEY, EmbeddingPipe, cfg, forward_fn=tied_head_loss, tied_weight_attr="embed_tokens.weight"
        )
    else:
        first, last = LayerSpec(EmbeddingPipe, cfg), LayerSpec(LMHeadPipe, cfg)
    inputs = BlockInputs()  # one per layer list: a stage's blocks share their rope tables and mask
    blocks = [
        LayerSpec(BlockPipe, cfg, i, attn_implementation, activation_checkpointing, inputs)
        for i in range(cfg.num_hidden_layers)
    ]
    return [first, *blocks, LayerSpec(NormPipe, cfg), last]


# ---- state-dict conversion ----


def to_pipeline_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Transformer.state_dict() -> the names PipelineModule.state_dict() uses when one stage holds every layer.

    `layers.{i}.<p>` -> `{i + 1}.<p>`, `norm.<p>` -> `{N + 1}.norm.<p>`, `lm_head.<p>` -> `{N + 2}.lm_head.<p>`,
    `embed_tokens.<p>` -> `0.embed_tokens.<p>`, or `tied_modules.embed.embed_tokens.<p>` when tied.
    """
    n = cfg.num_hidden_layers
    embed_prefix = f"tied_modules.{TIED_KEY}." if cfg.tie_word_embeddings else "0."
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith("embed_tokens."):
            out[embed_prefix + name] = tensor
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            out[f"{int(i) + 1}.{rest}"] = tensor
        elif name.startswith("norm."):
            out[f"{n + 1}.{name}"] = tensor
        elif name.startswith("lm_head."):
            out[f"{n + 2}.{name}"] = tensor
        else:
            raise ValueError(f"unexpected parameter {name!r} in a Transformer state dict")
    return out


def from_pipeline_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of to_pipeline_state_dict; also accepts `0.embed_tokens.*` for a tied embedding (layer_00 files)."""
    n = cfg.num_hidden_layers
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith(f"tied_modules.{TIED_KEY}."):
            out[name.removeprefix(f"tied_modules.{TIED_KEY}.")] = tensor
            continue
        idx, rest = name.split(".", 1)
        idx = int(idx)
        if idx == 0:
            out[rest] = tensor  # embed_tokens.<p>
        elif idx <= n:
            out[f"layers.{idx - 1}.{rest}"] = tensor
        elif idx in (n + 1, n + 2):
            out[rest] = tensor  # norm.<p> / lm_head.<p>
        else:
            raise ValueError(f"layer index {idx} in {name!r} is beyond the {n + 3} pipeline layers of this config")
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_pipeline_state(pipe: nn.Module, state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Copy a full Transformer state dict into a PipelineModule stage (only the layers this stage holds)."""
    converted = to_pipeline_state_dict(state_dict, cfg)
    own = pipe.state_dict()
    missing = sorted(set(own) - set(converted))
    if missing:
        raise ValueError(f"the state dict lacks pipeline parameters {missing[:5]}; was it made for another config?")
    pipe.load_state_dict({name: converted[name] for name in own})
