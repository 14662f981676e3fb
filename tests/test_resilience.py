"""Runs that cannot be lost: SIGKILL at random moments, the divergence guard's actions, job control, SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fault_injection import make_data, run_trial
from tests.helpers import ROOT, TINY, train, train_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return make_data(tmp_path_factory.mktemp("resilience"))


@pytest.fixture
def jobs_env(tmp_path) -> dict:
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o700)
    return {"SMALL_LLM_JOBS_DIR": str(jobs)}


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment_never_loses_more_than_one_save(trial, data_args, tmp_path):
    delay = random.Random(trial).uniform(3.0, 12.0)  # spans start-up, steps and checkpoint writes
    result = run_trial(tmp_path, delay, data_args)
    assert result["lost_steps"] <= 1


def _events(output_dir: Path) -> list[dict]:
    log = sorted((output_dir / "runs").iterdir())[-1] / "trainer_logs.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


SPIKE = ["--inject-lr-spike", "8,1000", "--max-steps", "16"]  # LR x1000 at step 8; checkpoints every 3 steps


@pytest.mark.parametrize("action", ["abort", "stop", "rollback"])
def test_divergence_guard_acts_within_a_few_steps_of_a_blow_up(action, data_args, tmp_path, jobs_env):
    out = tmp_path / "run"
    run = train(
        *TINY, *data_args, *SPIKE, "--init-model", "--divergence-action", action, "--output-dir", str(out), env=jobs_env
    )
    events = [e for e in _events(out) if e["type"] == "event"]
    divergence = [e for e in events if e["event"] == "divergence"]
    assert divergence, run.stdout[-2000:]
    assert 8 <= divergence[0]["step"] <= 12  # fired within 4 steps of the spike
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    if action == "abort":
        assert run.returncode == 1
        assert max(steps) < divergence[0]["step"]  # nothing saved after the blow-up; older checkpoints kept
        assert not (out / "final").exists()
    elif action == "stop":
        assert run.returncode == 1
        assert max(steps) == divergence[0]["step"]  # saved, then stopped
    else:
        assert run.returncode == 0, run.stderr[-2000:]
        rollbacks = [e for e in events if e["event"] == "rollback"]
        assert len(rollbacks) == 1 and rollbacks[0]["lr_factor"] == 0.5
        assert rollbacks[0]["step"] <= 8  # went back to the checkpoint before the spike
        losses = train_losses(out)
        assert losses[16] < 7.0  # recovered and finished the run
        assert (out / "final" / "model.safetensors").is_file()


def _start(data_args, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        *data_args,
        "--max-steps",
        "100000",
        "--output-dir",
        str(out),
        *extra,
    ]
    full_env = os.environ | {"OMP_NUM_THREADS": "1"} | env
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _control(env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lifecycle.control", "--jobs-dir", env["SMALL_LLM_JOBS_DIR"], *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _as_nobody(sock_path: Path) -> int:
    """Exit status of a child that drops to the `nobody` user and sends `stop` to the job: 13 = permission denied."""
    import pwd
    import socket

    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock_path))
                s.sendall(b"stop\n")
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1] >> 8


def _job_id(env: dict, proc: subprocess.Popen) -> str:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        listing = _control(env, "list").stdout
        for line in listing.splitlines():
            if f" {proc.pid} " in f" {line} ":
                return line.split()[0]
        time.sleep(0.5)
    raise AssertionError("the training job never registered")


def test_job_control_save_stop_and_abort_a_running_training(data_args, tmp_path, jobs_env):
    out = tmp_path / "run"
    proc = _start(data_args, out, jobs_env, "--init-model", "--step-cadence", "1")  # no scheduled saves
    job = _job_id(jobs_env, proc)
    if os.geteuid() == 0:  # another user cannot reach the job: its directory is 0700, its socket 0600
        assert _as_nobody(Path(jobs_env["SMALL_LLM_JOBS_DIR"]) / f"{job}.sock") == 13
        time.sleep(1.0)
        assert proc.poll() is None
    assert _control(jobs_env, "save", job).returncode == 0
    # Commands take effect at the next logging step (every 25 steps here): the save lands, and training goes on.
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None
    assert _control(jobs_env, "stop", job).returncode == 0
    assert proc.wait(timeout=120) == 0
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 2  # one for save, one for stop
    assert _control(jobs_env, "list").stdout.strip() == "no running jobs"

    proc = _start(data_args, out, jobs_env, "--step-cadence", "1")  # resumes, is aborted: nothing new is saved
    job = _job_id(jobs_env, proc)
    assert _control(jobs_env, "abort", job).returncode == 0
    assert proc.wait(timeout=120) == 1  # aborted: scripts must not carry on as after a finished run
    assert sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")) == saved


def test_sigterm_saves_and_stops_cleanly(data_args, tmp_path, jobs_env):
    out = tmp_path / "run"
    proc = _start(data_args, out, jobs_env, "--init-model", "--step-cadence", "1")
    _job_id(jobs_env, proc)  # registered: the loop is running
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    assert any((p / "COMPLETE").is_file() for p in (out / "checkpoints").glob("checkpoint-*"))
