"""Ways a run could lose or corrupt data, each reproduced on a tiny real run (single process, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY, train, write_corpus


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    import data

    root = tmp_path_factory.mktemp("safety")
    corpus = write_corpus(root / "docs.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), root / "tokenizer")
    return [*TINY, "--dataset", str(corpus), "--tokenizer", str(root / "tokenizer")]


def _log(output_dir: Path) -> list[dict]:
    (run_dir,) = (output_dir / "runs").iterdir()
    return [json.loads(line) for line in (run_dir / "trainer_logs.jsonl").read_text().splitlines()]


def test_resuming_a_copied_output_dir_leaves_the_original_alone(data_args, tmp_path):
    original, copy = tmp_path / "A", tmp_path / "B"
    run = train(*data_args, "--init-model", "--max-steps", "6", "--output-dir", str(original))
    assert run.returncode == 0, run.stderr[-2000:]
    log_before = _log(original)
    shutil.copytree(original, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-6")
    resumed = train(*data_args, "--max-steps", "6", "--output-dir", str(copy))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _log(original) == log_before  # the resume wrote into the copy's own log
    assert [r["step"] for r in _log(copy) if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    state = json.loads((copy / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert not Path(state["run_dir"]).is_absolute()


def test_resume_refuses_when_no_checkpoint_verifies(data_args, tmp_path):
    out = tmp_path / "run"
    assert train(*data_args, "--init-model", "--max-steps", "3", "--output-dir", str(out)).returncode == 0
    weights = out / "checkpoints" / "checkpoint-3" / "model-0.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    before = weights.read_bytes()
    resumed = train(*data_args, "--max-steps", "6", "--output-dir", str(out))
    assert resumed.returncode == 2
    assert "checkpoint-3" in resumed.stderr and "--init-model --overwrite-output-dir" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert weights.read_bytes() == before  # nothing was written over the damaged checkpoint


def test_stop_on_a_nan_never_saves_nan_weights(data_args, tmp_path):
    out = tmp_path / "run"
    spike = ["--inject-lr-spike", "5,1e30", "--divergence-action", "stop", "--max-steps", "12"]
    run = train(*data_args, *spike, "--init-model", "--output-dir", str(out))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "not saving non-finite weights" in run.stdout
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert steps and max(steps) < 6  # the last finite state is the newest checkpoint
    for step in steps:
        tensors = load_file(out / "checkpoints" / f"checkpoint-{step}" / "model-0.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), step


@pytest.mark.parametrize("action", ["none", "rollback"])
def test_text_samples_never_crash_a_diverged_run(data_args, tmp_path, action):
    out = tmp_path / action
    spike = ["--inject-lr-spike", "5,1e30", "--divergence-action", action, "--max-steps", "8", "--sample-tokens", "8"]
    run = train(*data_args, *spike, "--init-model", "--output-dir", str(out))
    assert "Traceback" not in run.stderr and "probability tensor" not in run.stderr, run.stderr[-2000:]
    assert run.returncode == 0
