"""Scale-out on CPU: 2-process DDP through Accelerate and a 2-stage DeepSpeed pipeline, against 1-process runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import PYTHON, ROOT, TINY, train, train_losses, write_corpus

pytestmark = pytest.mark.slow
ACCELERATE = [
    PYTHON,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(ROOT / "accelerate_configs/cpu_ddp.yaml"),
]
DEEPSPEED = [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import data

    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "docs.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), root / "tokenizer")
    untied = json.loads((ROOT / "models/configs/tiny.json").read_text()) | {"tie_word_embeddings": False}
    (root / "tiny-untied.json").write_text(json.dumps(untied))
    return root, [*TINY, "--dataset", str(corpus), "--tokenizer", str(root / "tokenizer"), "--init-model"]


def test_ddp_two_processes_match_one_process_with_twice_the_batch(setup):
    root, common = setup
    one = train(*common, "--batch-size", "4", "--max-steps", "4", "--output-dir", str(root / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = train(
        *common, "--batch-size", "2", "--max-steps", "4", "--output-dir", str(root / "two"), launcher=ACCELERATE
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single, ddp = train_losses(root / "one"), train_losses(root / "two")
    assert sorted(ddp) == [1, 2, 3, 4]
    for step in single:  # fp32; only the order of the cross-rank reductions differs
        assert ddp[step] == pytest.approx(single[step], abs=1e-5), step


def test_ddp_resume_is_bit_identical(setup):
    root, common = setup
    args = [*common, "--batch-size", "2"]
    full = train(*args, "--max-steps", "6", "--output-dir", str(root / "ddp-full"), launcher=ACCELERATE)
    assert full.returncode == 0, full.stderr[-3000:]
    first = train(*args, "--max-steps", "3", "--output-dir", str(root / "ddp-split"), launcher=ACCELERATE)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed_args = [a for a in args if a != "--init-model"]
    second = train(*resumed_args, "--max-steps", "6", "--output-dir", str(root / "ddp-split"), launcher=ACCELERATE)
    assert second.returncode == 0, second.stderr[-3000:]
    uninterrupted, resumed = train_losses(root / "ddp-full"), train_losses(root / "ddp-split")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert all(resumed[s] == uninterrupted[s] for s in (4, 5, 6))


@pytest.mark.parametrize("schedule,model", [("1F1B", "tiny"), ("GPipe", "untied")])
def test_pipeline_two_stages_matches_one_process(setup, schedule, model):
    root, common = setup
    model_args = ["--model", "tiny"] if model == "tiny" else ["--model-config", str(root / "tiny-untied.json")]
    # The pipeline splits a batch of 4 into 2 micro-batches of 2; the reference accumulates the same 2 micro-batches.
    ref_dir, pipe_dir = root / f"ref-{model}", root / f"pipe-{schedule}-{model}"
    ref = train(
        *common,
        *model_args,
        "--batch-size",
        "2",
        "--gradient-accumulation-steps",
        "2",
        "--max-steps",
        "5",
        "--output-dir",
        str(ref_dir),
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    first = train(
        *common,
        *model_args,
        "--pipeline",
        "--pipeline-schedule",
        schedule,
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--output-dir",
        str(pipe_dir),
        launcher=DEEPSPEED,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(
        *[a for a in common if a != "--init-model"],
        *model_args,
        "--pipeline",
        "--pipeline-schedule",
        schedule,
        "--batch-size",
        "4",
        "--max-steps",
        "5",
        "--output-dir",
        str(pipe_dir),
        launcher=DEEPSPEED,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    reference, pipeline = train_losses(ref_dir), train_losses(pipe_dir)
    assert sorted(pipeline) == [1, 2, 3, 4, 5]
    # DeepSpeed averages per-micro-batch mean losses where the reference weights every label equally: the two differ
    # by the spread of label counts between micro-batches (documents ending inside a row), well under 1e-3 here.
    for step in reference:
        assert pipeline[step] == pytest.approx(reference[step], abs=2e-3), step

    # The HF export assembled from both stages equals the weights of the final checkpoint's stages.
    import models
    from monitor.checkpoint import load_state_dict_file

    cfg = models.ModelConfig.from_dict(
        json.loads((pipe_dir / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())["model_config"]
    )
    merged = {}
    for stage in (0, 1):
        merged |= load_state_dict_file(pipe_dir / "checkpoints" / "checkpoint-5" / f"stage-{stage}.safetensors")
    trained = models.from_pipeline_state_dict(merged, cfg)
    exported, _ = models.load_hf(pipe_dir / "final")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
