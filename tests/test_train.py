"""End-to-end checks of train.py: the plan, a real run with resume, the HF export (bad input: test_bad_input.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, train, train_losses, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    import data

    out = tmp_path_factory.mktemp("tokenizer")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = data.train_tokenizer(texts, vocab_size=512)
    data.save_tokenizer(tok, out)
    return out


def test_dry_run_reports_the_plan_for_four_processes():
    out = train("--dry-run", "--json", "--world-size", "4", "--total-tokens", "3")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["tokens_per_step"] == 65_536  # 4096 x (4 x 1 x 4)
    assert plan["global_batch_size"] == 16
    assert plan["total_steps"] == 3_000_000_000 // 65_536 == 45_776
    assert plan["lr_scale"] == 4.0
    assert plan["max_lr"] == pytest.approx(5.6e-5)
    assert plan["constant_lr"] == pytest.approx(3.0e-5)
    assert plan["min_lr"] == pytest.approx(5.6e-6)
    assert plan["cooldown_steps"] == 100_000_000_000 // 65_536
    assert (plan["logging_steps"], plan["eval_steps"], plan["save_steps"]) == (25, 250, 5000)
    assert 150e6 < plan["parameters"]["total"] < 175e6


def test_dry_run_reproduces_the_spec_pipeline_batches():
    # Interleaved (2 stages per rank) on 2 GPUs with --batch-size 4: 4 micro-batches of 2, global batch 8.
    out = train(
        "--dry-run", "--json", "--pipeline", "--world-size", "2", "--pipeline-schedule", "ScheduleInterleaved1F1B"
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    pipe = plan["pipeline"]
    assert (pipe["stages"], pipe["stages_per_rank"], pipe["micro_batches"], pipe["micro_batch_size"]) == (4, 2, 4, 2)
    assert pipe["global_batch_size"] == plan["global_batch_size"] == 8
    assert plan["tokens_per_step"] == 8 * 4096 and plan["lr_scale"] == pytest.approx(8**0.5)  # as DDP on 2 GPUs
    # GPipe, --microbatch-scale 2 --batch-size 8 on 2 GPUs: 4 micro-batches of 4, global batch 16.
    args = ["--pipeline-schedule", "ScheduleGPipe", "--microbatch-scale", "2", "--batch-size", "8"]
    out = train("--dry-run", "--json", "--pipeline", "--world-size", "2", *args)
    pipe = json.loads(out.stdout)["pipeline"]
    assert (pipe["stages"], pipe["micro_batches"], pipe["micro_batch_size"], pipe["global_batch_size"]) == (2, 4, 4, 16)
    text = train("--dry-run", "--pipeline", "--world-size", "2", *args).stdout
    assert "4 of 4 sequences per step" in text and "ScheduleGPipe: 2 stages on 2 ranks" in text


def test_help_shows_every_default():
    out = train("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for default in ("(default: 4096)", "(default: 1.4e-05)", "(default: -1)", "(default: 4.0)", "(default: 1F1B)"):
        assert default in text, default


def test_dry_run_prints_a_readable_plan():
    out = train("--dry-run", "--world-size", "5")
    assert out.returncode == 0, out.stderr
    assert "81,920" in out.stdout  # tokens per step on 5 processes
    assert "parameters" in out.stdout


def test_dry_run_estimates_memory_for_the_precision_the_gpu_run_will_use():
    """On a CPU login node, --dtype auto plans for GPUs (bf16), says so, and --dtype fp32 plans for the CPU."""
    plans = {dtype: json.loads(train("--dry-run", "--json", "--dtype", dtype).stdout) for dtype in ("auto", "fp32")}
    assert plans["auto"]["memory_dtype"] == "bf16" and plans["fp32"]["memory_dtype"] == "fp32"
    assert plans["auto"]["memory"]["total"] < 0.6 * plans["fp32"]["memory"]["total"]
    text = train("--dry-run").stdout
    assert "memory (estimate in bf16" in text


def test_training_resumes_exactly_and_exports_a_transformers_model(corpus, tokenizer_dir, tmp_path):
    common = [*TINY, "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir)]
    full = train(*common, "--init-model", "--max-steps", "6", "--output-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    first = train(*common, "--init-model", "--max-steps", "3", "--output-dir", str(tmp_path / "split"))
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file()
    second = train(*common, "--max-steps", "6", "--output-dir", str(tmp_path / "split"))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout

    uninterrupted, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # resume appends to the same log, no duplicate steps
    for step in (4, 5, 6):
        assert resumed[step] == uninterrupted[step]  # bit-identical, not approximately equal

    # The export loads in transformers as a LlamaForCausalLM and matches our model's logits.
    from transformers import AutoModelForCausalLM

    import models

    final = tmp_path / "full" / "final"
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours, _ = models.load_hf(final)
    ids = torch.randint(0, hf.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - ours.eval()(ids)).abs().max().item()
    assert diff <= 1e-4
    assert "Hugging Face model:" in full.stdout and "sample:" in full.stdout
    final, last = tmp_path / "full" / "final", tmp_path / "full" / "checkpoints" / "checkpoint-6"
    assert (final / "model.safetensors").stat().st_mode == (final / "config.json").stat().st_mode  # umask, not 0600
    assert json.loads((final / "config.json").read_text())["max_position_embeddings"] == 64  # the trained length
    assert (last / "model-0.safetensors").stat().st_mode == (last / "trainer_state.json").stat().st_mode


@pytest.fixture(scope="module")
def trained_dir(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    """An output dir holding one complete checkpoint and its export."""
    out = tmp_path_factory.mktemp("trained")
    run = train(
        *TINY,
        "--dataset",
        str(corpus),
        "--tokenizer",
        str(tokenizer_dir),
        "--init-model",
        "--max-steps",
        "3",
        "--output-dir",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    return out


def test_init_from_continues_pretraining_from_an_exported_model(corpus, trained_dir, tmp_path):
    """--init-from takes the weights and the tokenizer of an HF folder: the first eval equals the source's last."""
    source = json.loads((trained_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    out = tmp_path / "continued"
    run = train(
        *TINY,
        "--dataset",
        str(corpus),
        "--init-from",
        str(trained_dir / "final"),
        "--init-model",
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    log = sorted((out / "runs").iterdir())[-1] / "trainer_logs.jsonl"
    first_eval = next(json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line)
    assert first_eval["step"] == 0
    assert first_eval["loss"] == pytest.approx(source["eval_loss"], abs=1e-5)


def test_save_strategy_epoch_saves_when_a_pass_over_the_data_ends(tokenizer_dir, tmp_path):
    small = tmp_path / "small.jsonl"
    docs = [json.loads(line)["text"] for line in write_corpus(tmp_path / "all.jsonl").read_text().splitlines()]
    # The first 16 characters of each docstring: a pass over the data every ~20 steps of 16 x 64 tokens.
    small.write_text("".join(json.dumps({"text": d[:16]}) + "\n" for d in docs))
    out = tmp_path / "run"
    run = train(
        *TINY,
        "--dataset",
        str(small),
        "--tokenizer",
        str(tokenizer_dir),
        "--init-model",
        "--max-steps",
        "50",
        "--batch-size",
        "16",
        "--save-strategy",
        "epoch",
        "--save-total-limit",
        "50",
        "--output-dir",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert len(steps) >= 3 and steps[-1] == 50  # at least two pass boundaries, plus the end


def test_curriculum_stage_switch_is_recorded_in_the_logs(corpus, tokenizer_dir, tmp_path):
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps({"text": t[:40]}) + "\n" for t in texts))  # short documents
    second.write_text(corpus.read_text())
    out = tmp_path / "run"
    spec = f"{first}@1kdocs~200docs;{second}"  # 1,000 short documents, the second file blended in over the last 200
    run = train(
        *TINY,
        "--dataset",
        spec,
        "--tokenizer",
        str(tokenizer_dir),
        "--init-model",
        "--max-steps",
        "40",
        "--batch-size",
        "16",
        "--step-cadence",
        "0.1",
        "--save-strategy",
        "no",
        "--output-dir",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    log = sorted((out / "runs").iterdir())[-1] / "trainer_logs.jsonl"
    stages = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "stage"]
    assert [r["stage"] for r in stages] == [1], run.stdout[-1500:]
    assert 3 <= stages[0]["step"] <= 40


def test_logs_tensorboard_and_monitor_commands_on_a_real_run(trained_dir, tmp_path):
    """trainer_logs.jsonl fields, TensorBoard files, and `python -m monitor summary/plot/compare` on train.py output."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = sorted((trained_dir / "runs").iterdir())[-1]
    records = [json.loads(line) for line in (run_dir / "trainer_logs.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    fields = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes", "time"}
    assert all(fields <= set(r) for r in train_records)
    assert {r["type"] for r in records} >= {"train", "eval", "summary"}
    assert (run_dir / "run_info.json").is_file()

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert "eval/loss" in events.Tags()["scalars"]
    assert any("sample" in tag for tag in events.Tags()["tensors"])  # text samples

    def monitor(*args):
        return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=120)

    summary = monitor("summary", str(trained_dir))
    assert summary.returncode == 0 and "eval" in summary.stdout, summary.stderr
    for args, png in (
        (["plot", str(trained_dir), "--loss-curves", "-o", str(tmp_path / "curves.png")], tmp_path / "curves.png"),
        (["compare", str(trained_dir), str(trained_dir), "-o", str(tmp_path / "cmp.png")], tmp_path / "cmp.png"),
    ):
        out = monitor(*args)
        assert out.returncode == 0, out.stderr
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert width >= 400 and height >= 300


def test_resume_with_a_larger_budget_continues_bit_identically(corpus, tokenizer_dir, tmp_path):
    """A 3-step budget (768 tokens) extended to 6 steps equals a 6-step budget run from the start."""
    common = [*TINY, "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir)]
    full = train(*common, "--init-model", "--total-tokens", "1.536e-6", "--output-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    first = train(*common, "--init-model", "--total-tokens", "7.68e-7", "--output-dir", str(tmp_path / "split"))
    assert first.returncode == 0, first.stderr[-2000:]
    more = train(*common, "--total-tokens", "1.536e-6", "--output-dir", str(tmp_path / "split"))
    assert more.returncode == 0, more.stderr[-2000:]
    uninterrupted, extended = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(extended) == [1, 2, 3, 4, 5, 6]
    assert all(extended[s] == uninterrupted[s] for s in (4, 5, 6))


def test_every_evaluation_prints_its_line_and_sample_tokens_0_samples_nowhere(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "quiet"
    common = [*TINY, "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir), "--init-model", "--max-steps", "3"]
    run = train(*common, "--sample-tokens", "0", "--output-dir", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for f in out.glob("runs/*/trainer_logs.jsonl") for line in f.read_text().splitlines()]
    evals = [r["step"] for r in records if r["type"] == "eval"]
    printed = [line for line in run.stdout.splitlines() if "| eval loss " in line]
    assert len(evals) >= 2 and [int(line.split()[1]) for line in printed] == evals
    assert "sample" not in run.stdout.lower()
    assert "Hugging Face model:" in run.stdout and "final eval loss" in run.stdout


def test_no_document_mask_trains_across_documents_and_evaluates_per_document(corpus, tokenizer_dir, tmp_path):
    """--no-document-mask changes what training attends to, not what evaluation measures: the same initial weights
    give the same step-0 eval loss (documents scored alone either way) and another step-1 training loss (rows of
    several documents attended as one text); a resume that drops the flag says so."""
    common = [*TINY, "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir), "--max-steps", "2"]

    def records(out: Path) -> list[dict]:
        log = next((out / "runs").iterdir()) / "trainer_logs.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()]

    masked, joined = tmp_path / "masked", tmp_path / "joined"
    assert train(*common, "--output-dir", str(masked)).returncode == 0
    assert train(*common, "--no-document-mask", "--output-dir", str(joined)).returncode == 0
    evals = [[r["loss"] for r in records(out) if r["type"] == "eval" and r["step"] == 0] for out in (masked, joined)]
    assert evals[0] == evals[1] and len(evals[0]) == 1
    assert train_losses(masked)[1] != pytest.approx(train_losses(joined)[1], rel=1e-4)
    resumed = train(*common[:-1], "4", "--output-dir", str(joined))
    assert resumed.returncode == 0 and "--no-document-mask True -> False" in resumed.stderr, resumed.stderr[-2000:]
