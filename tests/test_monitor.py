"""monitor/: JSON-lines logs with resume truncation, TensorBoard files, progress output, MFU arithmetic and the
divergence detector."""

import io
import json
import math
import random

import pytest
import torch
from rich.console import Console

from lifecycle.divergence import DivergenceDetector
from models.config import ModelConfig, count_parameters, matmul_params
from monitor import PeakMemory, Progress, RunLogger, find_run_dirs, new_run_dir, read_logs
from monitor.logs import LOG_NAME, resolve_log_file
from monitor.meter import Meter
from monitor.mfu import (
    device_peak_flops,
    flops_per_token,
    gpu_peak_flops,
    mean_attended_context,
    measured_peak_flops,
    mfu,
)

# -----------------------------------------------------------------------------
# JSON-lines logs


def test_records_have_type_step_time_and_strict_json(tmp_path):
    with RunLogger(tmp_path / "run", tensorboard=False) as log:
        log.train(1, tokens=512, loss=torch.tensor(2.5), lr=1e-3, grad_norm=float("nan"), tokens_per_s=100.0)
        log.eval(1, tokens=512, loss=2.0)
        log.event(1, "stage", name="tinystories")
        log.summary(1, final_eval_loss=2.0)
    lines = (tmp_path / "run" / LOG_NAME).read_text().splitlines()
    assert len(lines) == 4
    # Strict JSON: NaN is not allowed, so it must have been written as null.
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [r["type"] for r in records] == ["train", "eval", "event", "summary"]
    assert all(list(r)[:3] == ["type", "step", "time"] and isinstance(r["time"], float) for r in records)
    assert records[0]["loss"] == 2.5 and records[0]["grad_norm"] is None
    assert records[1]["perplexity"] == pytest.approx(math.exp(2.0))
    assert records[2]["event"] == "stage" and records[2]["name"] == "tinystories"
    assert read_logs(tmp_path / "run") == records


def test_bad_record_type_is_rejected(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log, pytest.raises(ValueError, match="record type"):
        log.log({"type": "metrics", "step": 1})


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "run", enabled=False)
    assert log.train(1, loss=1.0) is None
    log.text("sample", "hello", 1)
    log.close()
    assert not (tmp_path / "run").exists()


def _write_steps(run_dir, steps, loss_offset=0.0, resume_step=None, tensorboard=True):
    with RunLogger(run_dir, tensorboard=tensorboard, resume_step=resume_step) as log:
        for step in steps:
            log.train(step, tokens=step * 100, loss=10.0 - 0.1 * step + loss_offset, lr=1e-3)
            if step % 5 == 0:
                log.eval(step, tokens=step * 100, loss=9.0 - 0.1 * step + loss_offset)
                log.text("sample", f"text at step {step}", step)


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    _write_steps(run, range(1, 11), tensorboard=False)
    # The process died mid-line after step 10.
    with open(run / LOG_NAME, "a") as f:
        f.write('{"type": "train", "step": 11, "lo')
    assert [r["step"] for r in read_logs(run)][-1] == 10  # a partial last line is skipped, not an error
    _write_steps(run, range(8, 13), loss_offset=100.0, resume_step=7, tensorboard=False)
    records = read_logs(run)
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == list(range(1, 13))  # no duplicates, in order
    eval_steps = [r["step"] for r in records if r["type"] == "eval"]
    assert eval_steps == [5, 10]
    by_step = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    assert by_step[7] == pytest.approx(9.3) and by_step[8] == pytest.approx(109.2)  # old kept, new appended
    assert sorted(p.name for p in run.iterdir()) == [LOG_NAME]  # the temp file was renamed away


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / LOG_NAME).write_text('{"type": "train", "step": 1}\nnot json\n{"type": "train", "step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_logs(tmp_path)


def test_tensorboard_scalars_text_and_resume_purge(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _write_steps(run, range(1, 11))
    _write_steps(run, range(8, 13), loss_offset=100.0, resume_step=7)
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "eval/loss", "eval/perplexity"} <= set(tags["scalars"])
    train = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in train] == list(range(1, 13))  # steps 8-10 of the first attempt were purged
    assert train[6][1] == pytest.approx(9.3) and train[7][1] == pytest.approx(109.2)
    assert [e.step for e in acc.Scalars("eval/loss")] == [5, 10]
    assert "sample/text_summary" in tags["tensors"]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("sample/text_summary")}
    assert texts == {5: "text at step 5", 10: "text at step 10"}


def test_run_dirs_sort_oldest_first_and_resolve_to_newest(tmp_path):
    first = new_run_dir(tmp_path)
    first.mkdir(parents=True)
    second = new_run_dir(tmp_path)  # same second: gets a suffix that still sorts after
    second.mkdir()
    assert second != first
    assert find_run_dirs(tmp_path) == [first, second]
    _write_steps(first, [1], tensorboard=False)
    assert resolve_log_file(tmp_path) == first / LOG_NAME  # the newest run has no logs yet
    _write_steps(second, [1], tensorboard=False)
    assert resolve_log_file(tmp_path) == second / LOG_NAME
    assert resolve_log_file(second / LOG_NAME) == second / LOG_NAME
    with pytest.raises(ValueError, match="does not exist"):
        resolve_log_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="no trainer_logs.jsonl"):
        resolve_log_file(tmp_path / "runs")
    assert find_run_dirs(tmp_path / "missing") == []


# -----------------------------------------------------------------------------
# Progress


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    progress = Progress(total_steps=100, total_tokens=100 * 4096)
    metrics = {
        "loss": 3.0,
        "lr": 1.4e-4,
        "grad_norm": 0.5,
        "tokens_per_s": 12345.0,
        "mfu": 0.412,
        "peak_mem_bytes": 3 * 2**30,
    }
    progress.update(10, 10 * 4096, metrics)
    progress.print("saved checkpoint-10")
    progress.update(20, 20 * 4096, {**metrics, "loss": 2.0})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 10/100 | 41k/410k tok (10.0%)")
    for part in ("loss 3.0000 (ema 3.0000)", "lr 1.40e-04", "gnorm 0.500", "12.3k tok/s", "mfu 41.2%", "mem 3.00GiB"):
        assert part in lines[0]
    assert lines[1] == "saved checkpoint-10"
    assert "loss 2.0000 (ema 2.9000)" in lines[2]  # EMA with alpha 0.1


def test_progress_disabled_and_terminal_modes():
    quiet = Console(file=io.StringIO())
    progress = Progress(10, 1000, enabled=False, console=quiet)
    progress.update(1, 100, {"loss": 1.0})
    progress.print("hidden")
    progress.close()
    assert quiet.file.getvalue() == ""

    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    progress = Progress(10, 1000, console=terminal, start_step=2)
    progress.update(5, 500, {"loss": 1.5, "lr": 1e-3})
    progress.print("above the bar")
    progress.close()
    out = terminal.file.getvalue()
    assert "above the bar" in out and "step 5/10" in out and "loss 1.5000" in out


# -----------------------------------------------------------------------------
# MFU


class _Cfg:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_flops_per_token_by_hand():
    cfg = _Cfg(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=None,
        vocab_size=100,
    )
    # head_dim = 64 / 4 = 16; q and o: 64*64 = 4096 each; k and v: 64*(2*16) = 2048 each -> 12288
    # gated MLP: 3 * 64 * 176 = 33792; per layer 46080; 2 layers 92160; LM head 100 * 64 = 6400 -> 98560
    assert matmul_params(cfg) == 98560
    same_shape = ModelConfig(**cfg.__dict__)
    assert count_parameters(same_shape)["matmul"] == 98560  # the parameter count and the FLOP count agree
    # One row of 8 tokens holding documents of 3 and 5 tokens: keys attended 1+2+3 + 1+2+3+4+5 = 21 -> 21/8
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    assert mean_attended_context(doc_ids) == pytest.approx(2.625)
    assert mean_attended_context([3, 5]) == pytest.approx(2.625)
    # 6 * 98560 = 591360; attention 12 * 2 layers * 4 heads * 16 * 2.625 = 4032 -> 595392
    assert flops_per_token(cfg, 2.625) == pytest.approx(595392)
    # 1000 tokens/s on a 1 GFLOP/s device: 1000 * 595392 / 1e9
    assert mfu(1000, flops_per_token(cfg, 2.625), 1e9) == pytest.approx(0.595392)


def test_flops_per_token_explicit_head_dim():
    cfg = _Cfg(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=50,
    )
    # q, o: 64 * 128 = 8192 each; k, v: 64 * 32 = 2048 each -> 20480; MLP 3 * 64 * 128 = 24576
    # (20480 + 24576) * 3 = 135168; head 50 * 64 = 3200 -> 138368; attention 12 * 3 * 4 * 32 * 10 = 46080
    assert flops_per_token(cfg, 10.0) == pytest.approx(6 * 138368 + 46080)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_matmul_params_match_hugging_face_linear_layers(family):
    """Oracle: the weights of every nn.Linear in the Hugging Face model (attention, MLP, LM head)."""
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=16)  # head_dim != hidden / heads
        model = transformers.Qwen3ForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear


def test_mean_attended_context_matches_explicit_mask():
    torch.manual_seed(0)
    B, T = 3, 64
    # Random non-decreasing segment ids starting at 0 in every row.
    doc_ids = torch.cumsum((torch.rand(B, T) < 0.1).long(), dim=1)
    doc_ids -= doc_ids[:, :1]
    causal = torch.ones(T, T).tril().bool()
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T) query x key
    expected = mask.sum(-1).double().mean().item()
    assert mean_attended_context(doc_ids) == pytest.approx(expected)
    assert mean_attended_context(torch.zeros(T, dtype=torch.long)) == pytest.approx((T + 1) / 2)
    with pytest.raises(ValueError):
        mean_attended_context([])


def test_gpu_peak_table_lookup():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", bf16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", bf16) == 756e12
    assert gpu_peak_flops("NVIDIA H200", torch.float16) == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", bf16) == 312e12
    assert gpu_peak_flops("NVIDIA A10G", bf16) == 70e12
    assert gpu_peak_flops("NVIDIA L4", bf16) == 121e12
    assert gpu_peak_flops("NVIDIA L40S", bf16) == 362e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", bf16) == 165e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.float16) == 125e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", bf16) == 15.7e12  # no bf16 tensor cores
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", fp32) == 19.5e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", fp32, tf32=True) == 156e12
    assert gpu_peak_flops("Some Future GPU", bf16) is None


def test_cpu_peak_is_measured_once_and_cached():
    measured_peak_flops.cache_clear()
    peak = device_peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < peak < 1e14  # a real measured FLOP/s figure, not a table value or a unit mistake
    assert device_peak_flops(torch.device("cpu"), torch.float32) == peak
    assert measured_peak_flops.cache_info().hits == 1


def test_peak_memory_on_cpu_is_the_process_max_rss():
    meter = PeakMemory(torch.device("cpu"))
    first = meter.read_and_reset()
    assert first > 10 * 2**20  # a Python process with torch loaded uses well over 10 MiB
    assert meter.read_and_reset() >= first  # not resettable: never goes down


# -----------------------------------------------------------------------------
# Divergence detector


def _noisy_curve(steps: int, seed: int = 0) -> list[float]:
    """A realistic loss curve: fast early drop, slow decay, Gaussian noise and occasional one-step spikes."""
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        loss = 2.8 + 8.0 * math.exp(-step / 150) + 0.5 * math.exp(-step / 2000) + rng.gauss(0, 0.15)
        if rng.random() < 0.01:
            loss += rng.uniform(0.5, 1.5)  # a bad batch now and then
        losses.append(loss)
    return losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divergence_never_fires_on_normal_training(seed):
    detector = DivergenceDetector()
    for step, loss in enumerate(_noisy_curve(6000, seed), start=1):
        assert detector.update(step, loss, grad_norm=1.0) is None, f"false alarm at step {step}"
        if step % 500 == 0:
            assert detector.update_eval(step, loss - 0.05) is None


@pytest.mark.parametrize("jump, within", [(2.0, 6), (3.0, 4), (1.5, 8)])
def test_divergence_fires_within_a_few_steps_of_a_blow_up(jump, within):
    detector = DivergenceDetector()
    losses = _noisy_curve(6000, seed=3)
    blow_up = 4000
    fired = None
    for step, loss in enumerate(losses, start=1):
        if step >= blow_up:
            loss += jump
        reason = detector.update(step, loss)
        if reason is not None:
            fired = step
            break
    assert fired is not None and blow_up <= fired < blow_up + within, f"fired at {fired}"
    assert "training loss diverged" in reason and f"step {fired}" in reason


def test_divergence_is_not_armed_during_warmup():
    detector = DivergenceDetector(warmup_steps=500)
    assert all(detector.update(step, 2.0 + (5.0 if step > 50 else 0.0)) is None for step in range(1, 500))


def test_non_finite_values_fire_at_once():
    detector = DivergenceDetector(warmup_steps=1000)
    assert "training loss is nan" in detector.update(1, float("nan"))
    assert "gradient norm is inf" in detector.update(2, 3.0, grad_norm=float("inf"))
    assert "eval loss is inf" in detector.update_eval(3, float("inf"))
    assert detector.update(4, 3.0, grad_norm=torch.tensor(1.0)) is None


def test_eval_divergence():
    detector = DivergenceDetector(warmup_steps=500)
    # The step-0 eval (loss ~ln(vocab)) comes before warmup and must not become the reference.
    for step, loss in [(0, 10.8), (1000, 4.0), (2000, 3.5), (3000, 3.3), (4000, 3.2), (5000, 3.15), (6000, 3.1)]:
        assert detector.update_eval(step, loss) is None
    assert detector.eval.count == 6
    reason = detector.update_eval(7000, 3.1 + 2.0)
    assert reason is not None and "eval loss diverged at step 7000" in reason


def test_divergence_state_survives_a_json_round_trip():
    original = DivergenceDetector(warmup_steps=10)
    losses = _noisy_curve(300, seed=4)
    for step, loss in enumerate(losses[:200], start=1):
        original.update(step, loss)
    original.update_eval(200, 3.0)
    restored = DivergenceDetector(warmup_steps=10)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for step, loss in enumerate(losses[200:] + [12.0] * 10, start=201):
        assert restored.update(step, loss) == original.update(step, loss)
    assert restored.state_dict() == original.state_dict()
    assert restored.train.gap > 1.0  # the blow-up at the end was seen by both


@pytest.mark.parametrize("width", [80, 100, 120])
def test_progress_line_fits_the_terminal_and_keeps_what_matters(width):
    """Rendered by rich in a terminal of `width` columns: step, percentage, ETA and loss always show, nothing is cut
    off, and a wider terminal shows more (at 120: the bar, tokens, LR, grad norm and throughput too)."""
    import re

    terminal = Console(file=io.StringIO(), force_terminal=True, width=width)
    progress = Progress(3072, 3_000_000, console=terminal)
    metrics = {"loss": 7.5102, "lr": 1.94e-3, "grad_norm": 0.648, "tokens_per_s": 17300.0, "mfu": 0.525}
    progress.update(800, 1_640_000, {**metrics, "peak_mem_bytes": 0.78 * 2**30})
    progress._live.refresh()
    progress.close()
    frames = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", terminal.file.getvalue()).replace("\r", "\n").splitlines()
    line = [f for f in frames if f.startswith("step 800/3072")][-1]
    assert len(line) <= width and "…" not in line
    for part in ("step 800/3072", "54.7%", "eta ", "loss 7.5102"):
        assert part in line, (width, line)
    if width >= 100:
        assert "━" in line and "1.64M/3M tok" in line and "lr 1.94e-03" in line
    if width >= 120:
        assert "gnorm 0.648" in line and "17.3k tok/s" in line


def test_mfu_on_a_cpu_never_reads_above_100_percent():
    """A measured CPU peak is a lower bound of the real one: an interval that runs faster raises it."""
    cfg = ModelConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)
    meter = Meter(cfg, tokens_per_step=4096, world_size=1, peak_flops=1.0, device=torch.device("cpu"))
    meter.add_step(3.0)
    first = meter.record()
    assert first["mfu"] == pytest.approx(1.0) and meter.peak_flops > 1.0
    meter.add_step(3.0)
    assert meter.record()["mfu"] <= 1.0 + 1e-9


def test_a_damaged_log_line_never_blocks_a_resume(tmp_path, capsys):
    """A bad line that is not the last (a hand edit, disk damage, a non-object) is set aside with a warning; the
    records up to the resumed step are kept and the log goes on."""
    log = tmp_path / "trainer_logs.jsonl"
    lines = [
        json.dumps({"type": "train", "step": 1, "loss": 3.0}),
        "{not json",
        "[1, 2]",
        json.dumps({"type": "train", "step": "two"}),
        json.dumps({"type": "train", "step": 2, "loss": 2.5}),
        json.dumps({"type": "train", "step": 3, "loss": 2.0}),
        '{"type": "tr',  # a write cut short by a kill: dropped quietly
    ]
    log.write_text("\n".join(lines) + "\n")
    with RunLogger(tmp_path, tensorboard=False, resume_step=2) as logger:
        logger.train(3, loss=1.9)
    assert [(r["step"], r["loss"]) for r in read_logs(log)] == [(1, 3.0), (2, 2.5), (3, 1.9)]
    assert (tmp_path / "trainer_logs.jsonl.bad-lines").read_text().splitlines() == lines[1:4]
    assert "3 unreadable line(s)" in capsys.readouterr().err


def test_long_phases_tick_in_plain_lines_off_a_terminal():
    """console.Ticker (eval.py's reading and scoring, data.prepare, tokenizer training): a line per interval on a
    pipe, nothing for a phase shorter than one interval."""
    import io

    from console import Ticker

    every, quiet = io.StringIO(), io.StringIO()
    with Ticker("scoring", total=10, unit="windows", every=0.0, stream=every) as tick:
        for _ in range(3):
            tick.advance(2)
    with Ticker("scoring", total=10, unit="windows", stream=quiet) as tick:  # 30 s between lines
        tick.advance(10)
    assert every.getvalue().splitlines() == ["scoring: 2/10 windows", "scoring: 4/10 windows", "scoring: 6/10 windows"]
    assert quiet.getvalue() == "" and tick.done == 10
