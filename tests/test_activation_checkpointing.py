"""--activation-checkpointing: the block recomputes its activations in the backward; same maths, less kept."""

from __future__ import annotations

import pytest
import torch

import models
from bench.memory import saved_activation_bytes
from models.pipeline import BlockPipe
from tests.test_distributed import DEEPSPEED, TWO, assert_same_run, reference, run, setup  # noqa: F401


def _packed_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 64), generator=g)
    pos = torch.cat([torch.arange(30), torch.arange(34)]).expand(2, 64)
    doc = (torch.arange(64) >= 30).long().expand(2, 64)
    return ids, pos, doc


def test_checkpointed_blocks_give_identical_loss_and_gradients():
    cfg = models.load_model_config("tiny", vocab_size=512)
    torch.manual_seed(0)
    plain = models.Transformer(cfg)
    plain.init_weights()
    checkpointed = models.Transformer(cfg, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert all(block.activation_checkpointing for block in checkpointed.layers)
    ids, pos, doc = _packed_batch(cfg.vocab_size)
    losses = [m(ids, pos, doc, labels=ids) for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_checkpointing_keeps_far_fewer_activations_for_the_backward():
    cfg = models.load_model_config("tiny", vocab_size=512)
    plain, checkpointed = (saved_activation_bytes(cfg, 256, ac) for ac in (False, True))
    assert checkpointed < 0.4 * plain, (plain, checkpointed)


def test_the_pipeline_layer_list_carries_the_flag():
    cfg = models.load_model_config("tiny", vocab_size=512)
    specs = models.pipeline_layers(cfg, "sdpa", activation_checkpointing=True)
    blocks = [spec.build() for spec in specs if spec.typename is BlockPipe]
    assert len(blocks) == cfg.num_hidden_layers and all(b.activation_checkpointing for b in blocks)
    assert not any(s.build().activation_checkpointing for s in models.pipeline_layers(cfg) if s.typename is BlockPipe)

    # A checkpointed pipeline block computes the same output and gradients as a plain one.
    plain = BlockPipe(cfg, 0)
    plain.load_state_dict(blocks[0].state_dict())
    ids, pos, doc = _packed_batch(cfg.vocab_size)
    hidden = torch.randn(2, 64, cfg.hidden_size)
    outs = [b((hidden, pos, doc, ids))[0] for b in (plain, blocks[0])]
    for out in outs:
        out.square().sum().backward()
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(plain.parameters(), blocks[0].parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.slow
def test_checkpointed_pipeline_stages_match_one_process(setup, reference):  # noqa: F811
    """2-stage DeepSpeed pipeline with --activation-checkpointing against the uninterrupted single process."""
    pipe = run(setup, "pipe-ac", *TWO, "--pipeline", "--activation-checkpointing", "--max-steps", "6",
               launcher=DEEPSPEED)  # fmt: skip
    assert_same_run(pipe, reference["tiny"])
