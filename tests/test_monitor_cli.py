"""`python -m monitor summary | plot | compare | tb` on logs written by RunLogger."""

import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import monitor.__main__ as cli
from monitor import RunLogger, read_logs

ROOT = Path(__file__).resolve().parents[1]


def _synthetic_run(output_dir: Path, offset: float, steps: int = 200) -> Path:
    """A run with a decaying train loss every step, evals every 50 steps, one event and a summary."""
    run_dir = output_dir / "runs" / "20250101-000000"
    with RunLogger(run_dir, tensorboard=False) as log:
        log.event(0, "start", args={"lr": 1e-3}, time=1000.0)
        for step in range(1, steps + 1):
            loss = 3.0 + offset + 7.0 * math.exp(-step / 30) + 0.05 * math.sin(step)
            log.train(
                step,
                tokens=step * 2048,
                loss=loss,
                lr=1e-3 * min(1.0, step / 20),
                grad_norm=1.0,
                tokens_per_s=1000.0 + step,
                mfu=0.3,
                peak_mem_bytes=2**30,
                time=1000.0 + 2 * step,
            )
            if step % 50 == 0:
                log.eval(step, tokens=step * 2048, loss=loss + 0.1, time=1000.0 + 2 * step)
        log.summary(steps, tokens=steps * 2048, time=1000.0 + 2 * steps)
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_summary_table(tmp_path, capsys):
    a = _synthetic_run(tmp_path / "run-a", offset=0.0)
    _synthetic_run(tmp_path / "run-b", offset=0.5)
    assert cli.main(["summary", str(tmp_path / "run-a"), str(tmp_path / "run-b" / "runs")]) == 2  # no logs there
    capsys.readouterr()
    assert cli.main(["summary", str(a), str(tmp_path / "run-b")]) == 0
    out = capsys.readouterr().out
    records = read_logs(a)
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    best_eval = min(evals, key=lambda r: r["loss"])
    assert "run-a/20250101-000000" in out and "run-b/20250101-000000" in out
    assert f"{train[-1]['loss']:.4f} / {min(r['loss'] for r in train):.4f}" in out
    assert f"{evals[-1]['loss']:.4f} / {best_eval['loss']:.4f} ({best_eval['step']})" in out
    assert "1.1k" in out  # mean tokens/s of 1001..1200
    assert "30.0%" in out and "6m40s" in out and "410k" in out  # MFU, 400 s of wall time, 200 * 2048 tokens


def test_summary_numbers():
    records = [
        {"type": "train", "step": 1, "time": 10.0, "tokens": 100, "loss": 5.0, "tokens_per_s": 10.0},
        {"type": "train", "step": 2, "time": 20.0, "tokens": 200, "loss": 4.0, "tokens_per_s": 30.0},
        {"type": "eval", "step": 2, "time": 25.0, "tokens": 200, "loss": 4.5},
        {"type": "train", "step": 3, "time": 30.0, "tokens": 300, "loss": 4.2, "tokens_per_s": 20.0},
    ]
    s = cli.summarize(records)
    assert s["steps"] == 3 and s["tokens"] == 300
    assert (s["final_train_loss"], s["best_train_loss"]) == (4.2, 4.0)
    assert (s["final_eval_loss"], s["best_eval_loss"], s["best_eval_step"]) == (4.5, 4.5, 2)
    assert s["mean_tokens_per_s"] == 20.0 and s["wall_time_s"] == 20.0 and s["mean_mfu"] is None


def test_plot_writes_a_png_next_to_the_logs(tmp_path, capsys):
    run_dir = _synthetic_run(tmp_path / "out", offset=0.0)
    assert cli.main(["plot", str(tmp_path / "out"), "--loss-curves"]) == 0
    png = run_dir / "loss_curves.png"
    assert f"wrote {png}" in capsys.readouterr().out
    width, height = _png_size(png)
    assert width > 600 and height > 400
    assert png.stat().st_size > 10_000


def test_compare_writes_the_requested_png(tmp_path):
    runs = [_synthetic_run(tmp_path / name, offset=i * 0.3) for i, name in enumerate(["a", "b", "c"])]
    out = tmp_path / "plots" / "compare.png"
    assert cli.main(["compare", *map(str, runs), "-o", str(out)]) == 0
    width, height = _png_size(out)
    assert width > 600 and height > 400
    assert out.stat().st_size > 10_000


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "trainer_logs.jsonl").write_text('{"type": "event", "step": 0, "event": "start"}\n')
    (tmp_path / "list.jsonl").write_text("[1, 2, 3]\n")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(128, 256)))
    for argv in (
        ["summary", str(tmp_path / "list.jsonl")],
        ["summary", str(tmp_path / "binary.jsonl")],
        ["summary", str(tmp_path / "missing")],
        ["plot", str(empty)],
        ["compare", str(empty)],
        ["tb", str(tmp_path / "missing")],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [[], ["compare"], ["tb", "--port", "abc"], ["tb", "--port", "-5"], ["tb", "--port", "99999"],
     ["control", "bogus"], ["control", "stop"]],
)  # fmt: skip
def test_usage_errors_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_damaged_records_are_skipped_and_unwritable_outputs_are_one_line(tmp_path, capsys):
    run_dir = _synthetic_run(tmp_path / "out", offset=0.0, steps=20)
    log = run_dir / "trainer_logs.jsonl"
    lines = log.read_text().splitlines()
    damaged = ["[1, 2]", '"text"', '{"type": "train", "step": "x", "loss": "bad"}', '{"type": 3, "step": 1}']
    log.write_text("\n".join(lines[:5] + damaged + lines[5:]) + "\n")
    assert cli.main(["summary", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "skipped 4 line(s)" in out.err and "out/" in out.out
    assert [r["step"] for r in read_logs(log)] == [r["step"] for r in read_logs(log) if isinstance(r["step"], int)]
    # -o a folder: the PNG goes into it, and the path said is the one written
    folder = tmp_path / "plots"
    folder.mkdir()
    assert cli.main(["plot", str(tmp_path / "out"), "-o", str(folder)]) == 0
    assert f"wrote {folder / 'loss_curves.png'}" in capsys.readouterr().out and (folder / "loss_curves.png").is_file()
    for target in ("/proc/x.png", str(tmp_path / "file.txt" / "x.png")):
        (tmp_path / "file.txt").write_text("a file")
        assert cli.main(["plot", str(tmp_path / "out"), "-o", target]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith(f"error: cannot write {target}") and "Traceback" not in "\n".join(err)


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "plot", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "does not exist" in result.stderr


def test_tb_runs_tensorboard_on_localhost_by_default(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert cli.main(["tb", str(tmp_path), "--port", "6123"]) == 0
    assert cli.main(["tb", str(tmp_path), "--bind-all"]) == 0
    local, everywhere = calls
    assert local[1:3] == ["-m", "tensorboard.main"]
    assert local[local.index("--logdir") + 1] == str(tmp_path)
    assert local[local.index("--host") + 1] == "127.0.0.1" and local[local.index("--port") + 1] == "6123"
    assert "--bind_all" in everywhere and "--host" not in everywhere
    pytest.importorskip("tensorboard.main")  # the module the command runs exists


def test_the_specs_command_habits(tmp_path, monkeypatch, capsys):
    """summary and plot without RUN take the newest run under output_models/; tb --all; plot -e opens the PNG."""
    import os
    import time

    monkeypatch.chdir(tmp_path)
    assert cli.main(["summary"]) == 2 and "no runs under output_models/" in capsys.readouterr().err
    old = _synthetic_run(tmp_path / "output_models" / "old", offset=0.0, steps=10)
    new = _synthetic_run(tmp_path / "output_models" / "new", offset=0.5, steps=10)
    past = time.time() - 100
    os.utime(old / "trainer_logs.jsonl", (past, past))
    assert cli.main(["summary"]) == 0
    out = capsys.readouterr()
    assert f"the newest run: {new.relative_to(tmp_path)}" in out.err and "new/" in out.out and "old/" not in out.out
    monkeypatch.setenv("PATH", str(tmp_path))  # no image viewer on this PATH
    assert cli.main(["plot", "-e"]) == 0
    out = capsys.readouterr()
    assert (new / "loss_curves.png").is_file() and "no image viewer found" in out.err
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    (tmp_path / "output_models").mkdir(exist_ok=True)
    assert cli.main(["tb", "--all"]) == 0
    assert calls[0][calls[0].index("--logdir") + 1] == "output_models"
