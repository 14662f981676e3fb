"""--compile: the compiled loss path gives eager's loss and gradients and never recompile for another layout."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from bench.model_throughput import packed_batch
from tests.helpers import TINY, train, train_losses, write_corpus

pytestmark = pytest.mark.slow  # compiling with inductor takes tens of seconds on 2 cores


def layouts(vocab: int, varlen: bool = False) -> list[dict]:
    """Batches of one shape with different document layouts: 3, 1 (doc_ids None and all zeros), 5, 2 per row;
    `varlen`: with the document offsets the data path adds for that backend."""
    batches = [packed_batch(2, 48, docs, vocab, "cpu", seed) for seed, docs in enumerate((3, 1, 1, 5, 2))]
    batches[1]["doc_ids"] = None
    if varlen:
        for batch in batches:
            batch["cu_seqlens"] = models.varlen_offsets(batch["doc_ids"], 2, 48)
    return batches


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "varlen"])
def test_compiled_loss_path_matches_eager_without_recompiling(attn: str) -> None:
    """The block mask (flex) or dense mask (sdpa) is built outside the graph; the graph takes any layout."""
    cfg = models.load_model_config("tiny", vocab_size=256)
    torch.manual_seed(0)
    eager = models.Transformer(cfg, attn_implementation=attn)
    eager.init_weights()
    compiled = copy.deepcopy(eager)
    compiled.compile_loss_path()
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints keep their names
    graphs = None
    for i, batch in enumerate(layouts(cfg.vocab_size, attn == "varlen")):
        loss_c = compiled(**batch)
        loss_c.backward()
        loss_e = eager(**batch)
        loss_e.backward()
        assert loss_c.item() == pytest.approx(loss_e.item(), abs=1e-5), i
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=0), (i, name)
        compiled.zero_grad()
        eager.zero_grad()
        if graphs is None:
            graphs = models.compiled_graphs()  # after the first batch: the training graph
            assert graphs >= 1  # the compiled path ran
        assert models.compiled_graphs() == graphs, f"recompiled for layout {i}"
    if attn != "flex_attention":  # flex's eager CPU kernel compiles torch's own helpers (Dynamo counts them): not ours
        with torch.no_grad():  # generation's logits path runs eagerly: no graph for each new length
            compiled(layouts(cfg.vocab_size)[0]["input_ids"][:, :17])
        assert models.compiled_graphs() == graphs
    with torch.no_grad():  # evaluation: one more graph (no autograd), then none for any layout
        for i, batch in enumerate(layouts(cfg.vocab_size, attn == "varlen")):
            before = models.compiled_graphs()
            loss_c = compiled(**batch).item()
            assert i == 0 or models.compiled_graphs() == before, f"evaluation recompiled for layout {i}"
            assert loss_c == pytest.approx(eager(**batch).item(), abs=1e-5), i  # (eager flex compiles torch's helpers)


def test_train_py_compile_matches_eager_and_reports(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "docs.jsonl", max_docs=600)
    common = [*TINY, "--dataset", str(corpus), "--vocab-size", "512", "--max-steps", "4", "--init-model"]
    eager = train(*common, "--output-dir", str(tmp_path / "eager"))
    assert eager.returncode == 0, eager.stderr[-2000:]
    compiled = train(*common, "--compile", "--output-dir", str(tmp_path / "compiled"))
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert "compile: first step" in compiled.stdout and "recompiled" not in compiled.stdout + compiled.stderr
    losses, ref = train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager")
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(losses[s] == pytest.approx(ref[s], abs=1e-5) for s in ref)
    # The default job's kernel: flex attention compiles with the loss path (on CPU its training runs the same mask
    # through sdpa, so the losses equal eager sdpa's).
    flex_args = ["--compile", "--attn-implementation", "flex_attention"]
    flex = train(*common, *flex_args, "--output-dir", str(tmp_path / "flex"))
    assert flex.returncode == 0, flex.stderr[-2000:]
    assert "compile: first step" in flex.stdout and "recompiled" not in flex.stdout + flex.stderr
    losses = train_losses(tmp_path / "flex")
    assert sorted(losses) == [1, 2, 3, 4] and all(losses[s] == pytest.approx(ref[s], abs=1e-5) for s in ref)
    # varlen: the document offsets built on the host by the data path, its CPU reference compiled with the loss path
    varlen = train(*common, "--compile", "--attn-implementation", "varlen", "--output-dir", str(tmp_path / "varlen"))
    assert varlen.returncode == 0, varlen.stderr[-2000:]
    assert "compile: first step" in varlen.stdout and "recompiled" not in varlen.stdout + varlen.stderr
    losses = train_losses(tmp_path / "varlen")
    assert sorted(losses) == [1, 2, 3, 4] and all(losses[s] == pytest.approx(ref[s], abs=1e-5) for s in ref)
