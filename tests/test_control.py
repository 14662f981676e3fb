"""Job control: a live job (a small loop standing in for train.py) receives save / stop / abort from
`python -m monitor control`, and other users can neither see nor command it."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lifecycle import control
from lifecycle.jobs import JobControl, list_jobs, private_jobs_dir, send_command

ROOT = Path(__file__).resolve().parents[1]

# Stands in for the training loop: polls every "step", reports what it got, exits on stop (0) or abort (3).
FAKE_TRAINER = """
import sys, time
from pathlib import Path
from lifecycle.jobs import JobControl

job = JobControl(Path(sys.argv[1]), sys.argv[2], jobs_dir=Path(sys.argv[3]))
print(job.job_id, flush=True)
step, command = 0, None
while command not in ("stop", "abort"):
    step += 1
    time.sleep(0.01)
    command = job.poll()
    if command:
        print(f"step {step}: {command}", flush=True)
job.close()
sys.exit(0 if command == "stop" else 3)
"""


@pytest.fixture
def jobs_dir():
    # NOTE: Unix socket paths are limited to ~107 bytes, so stay out of pytest's long tmp_path.
    base = Path(tempfile.mkdtemp(prefix="jobs-", dir="/tmp"))
    os.chmod(base, 0o711)  # traversable, so the other-user tests reach the (private) jobs dir itself
    yield base / "jobs"
    shutil.rmtree(base, ignore_errors=True)


def _run_control(jobs_dir: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = control.main(["--jobs-dir", str(jobs_dir), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_save_stop_abort_a_live_job(jobs_dir, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", FAKE_TRAINER, str(tmp_path / name), name, str(jobs_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("alpha", "beta")
    }
    try:
        ids = {name: proc.stdout.readline().strip() for name, proc in procs.items()}
        assert ids == {name: f"{name}-{proc.pid}" for name, proc in procs.items()}
        _wait_for(lambda: len(list_jobs(jobs_dir)) == 2)

        code, out, _ = _run_control(jobs_dir, "list", capsys=capsys)
        assert code == 0 and ids["alpha"] in out and ids["beta"] in out and str(tmp_path / "alpha") in out
        assert stat.S_IMODE(os.stat(jobs_dir).st_mode) == 0o700
        for name in ids.values():
            assert stat.S_IMODE(os.stat(jobs_dir / f"{name}.sock").st_mode) == 0o600
            assert stat.S_IMODE(os.stat(jobs_dir / f"{name}.json").st_mode) == 0o600

        code, out, _ = _run_control(jobs_dir, "save", ids["alpha"], capsys=capsys)
        assert code == 0 and out.strip() == f"ok: save requested for {ids['alpha']}"
        assert "save" in procs["alpha"].stdout.readline()
        assert procs["alpha"].poll() is None  # save keeps training

        code, out, _ = _run_control(jobs_dir, "stop", "alph", capsys=capsys)  # a unique prefix is enough
        assert code == 0 and out.startswith("ok: stop")
        assert procs["alpha"].wait(timeout=30) == 0
        assert "stop" in procs["alpha"].stdout.read()

        code, out, _ = _run_control(jobs_dir, "abort", str(procs["beta"].pid), capsys=capsys)  # or the pid
        assert code == 0 and out.startswith("ok: abort")
        assert procs["beta"].wait(timeout=30) == 3

        code, out, _ = _run_control(jobs_dir, "list", capsys=capsys)
        assert out.strip() == "no running jobs"
        assert list(jobs_dir.iterdir()) == []  # close() removed the sockets and registrations
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_unknown_job_and_ambiguous_prefix_exit_2(jobs_dir, capsys):
    code, _, err = _run_control(jobs_dir, "save", "nope", capsys=capsys)
    assert code == 2 and err.startswith("error: unknown job 'nope'") and err.count("\n") == 1
    with JobControl(Path("a"), "run-1", jobs_dir=jobs_dir), JobControl(Path("b"), "run-2", jobs_dir=jobs_dir):
        code, _, err = _run_control(jobs_dir, "stop", "run-", capsys=capsys)
        assert code == 2 and "matches several jobs" in err


def test_command_from_the_module_entry_point(jobs_dir):
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "control", "--jobs-dir", str(jobs_dir), "abort", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown job 'x'" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "lifecycle.control", "--jobs-dir", str(jobs_dir), "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "no running jobs"
    assert result.stderr == ""  # in particular no runpy warning about lifecycle.control being imported twice


def test_command_is_queued_when_the_client_stops_waiting(jobs_dir):
    with JobControl(Path("out"), "slow", jobs_dir=jobs_dir) as job:
        # The job is busy (no poll) for longer than the client waits...
        assert send_command(job.job_id, "save", jobs_dir, timeout=0.2) is None
        # ...and still gets the command when it comes back to its loop.
        assert job.poll() == "save"
        assert job.poll() is None


def test_garbage_requests_are_answered_and_ignored(jobs_dir):
    with JobControl(Path("out"), "job", jobs_dir=jobs_dir) as job, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(job.socket_path))
        client.sendall(b"rm -rf /\n")
        assert job.poll() is None
        assert client.recv(1024).decode().startswith("error: unknown command")


def test_stale_registrations_are_cleaned_by_list(jobs_dir, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = JobControl(Path("out"), "live", jobs_dir=jobs_dir)
    stale = {**live.info, "job_id": f"gone-{dead.pid}", "pid": dead.pid, "socket": str(jobs_dir / "gone.sock")}
    (jobs_dir / f"gone-{dead.pid}.json").write_text(json.dumps(stale))
    (jobs_dir / "gone.sock").touch()
    try:
        assert [info["job_id"] for info in list_jobs(jobs_dir)] == [live.job_id]
        assert sorted(p.name for p in jobs_dir.iterdir()) == [f"{live.job_id}.json", f"{live.job_id}.sock"]
        # A registered job that no longer listens: exit 1 with a clear message.
        live._server.close()
        code, _, err = _run_control(jobs_dir, "save", live.job_id, capsys=capsys)
        assert code == 1 and "is not accepting commands" in err
        # Once its socket is gone as well it is forgotten.
        live.socket_path.unlink()
        assert list_jobs(jobs_dir) == []
        assert not live.info_path.exists()
    finally:
        live._server = None
        live.info_path.unlink(missing_ok=True)


def test_disabled_job_control_registers_nothing(jobs_dir):
    job = JobControl(Path("out"), "rank1", enabled=False, jobs_dir=jobs_dir)
    assert job.poll() is None
    job.close()
    assert not jobs_dir.exists()


def test_unsafe_jobs_directory_is_refused(jobs_dir, tmp_path):
    jobs_dir.mkdir(mode=0o755)
    os.chmod(jobs_dir, 0o755)
    with pytest.raises(ValueError, match="accessible to other users"):
        JobControl(Path("out"), "job", jobs_dir=jobs_dir)
    with pytest.raises(ValueError, match="chmod 700"):
        list_jobs(jobs_dir)
    os.chmod(jobs_dir, 0o700)
    link = tmp_path / "link"
    link.symlink_to(jobs_dir)
    with pytest.raises(ValueError, match="symlink"):
        private_jobs_dir(link)
    if os.getuid() == 0:
        os.chown(jobs_dir, 65534, 65534)
        with pytest.raises(ValueError, match="belongs to uid 65534"):
            private_jobs_dir(jobs_dir)
        os.chown(jobs_dir, 0, 0)


def _as_other_user(action, while_waiting=None) -> dict:
    """Run ``action()`` in a forked child switched to the uid/gid of `nobody` and return its result dict; this
    process calls ``while_waiting()`` in a loop meanwhile (e.g. polling, like a training loop)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only plain system calls from here on, then _exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = action()
        except BaseException as e:  # report anything, never return into pytest
            result = {"crash": repr(e)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
        if while_waiting is not None:
            while_waiting()
        time.sleep(0.01)
    data = os.read(read_end, 65536)
    os.close(read_end)
    return json.loads(data) if data else {"crash": "no result"}


def _attempt(fn) -> str:
    try:
        fn()
    except PermissionError:
        return "PermissionError"
    except OSError as e:
        return f"OSError {e.errno}"
    return "allowed"


needs_root = pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0,
    reason="needs root to switch to another uid (no other user's account is available to a normal user)",
)


@needs_root
def test_another_user_cannot_see_or_reach_the_job(jobs_dir):
    with JobControl(Path("out"), "private", jobs_dir=jobs_dir) as job:

        def try_everything() -> dict:
            def connect():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(job.socket_path))
                    s.sendall(b"stop\n")

            return {
                "list": _attempt(lambda: os.listdir(jobs_dir)),
                "read": _attempt(lambda: open(job.info_path).read()),
                "connect": _attempt(connect),
                "drop_command": _attempt(lambda: open(jobs_dir / "evil.json", "w").write("{}")),
            }

        result = _as_other_user(try_everything)
        assert result == {key: "PermissionError" for key in ("list", "read", "connect", "drop_command")}, result
        assert job.poll() is None


@needs_root
def test_peer_uid_check_refuses_another_user_even_with_open_permissions(jobs_dir):
    """Defence in depth: if the directory and socket were opened up, the job still checks SO_PEERCRED."""
    if not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("SO_PEERCRED is Linux-only")
    with JobControl(Path("out"), "private", jobs_dir=jobs_dir) as job:
        os.chmod(jobs_dir, 0o711)
        os.chmod(job.socket_path, 0o666)

        def send_stop() -> dict:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(job.socket_path))
                s.sendall(b"stop\n")
                s.settimeout(30)
                return {"reply": s.recv(1024).decode()}

        commands = []
        result = _as_other_user(send_stop, while_waiting=lambda: commands.append(job.poll()))
        os.chmod(jobs_dir, 0o700)
        assert result.get("reply", "").startswith("refused"), result
        assert set(commands) == {None}
        assert job.poll() is None


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e9", "soon"])
def test_a_bad_timeout_is_refused_before_anything_is_sent(jobs_dir, timeout, capsys):
    with JobControl(Path("out"), "job", jobs_dir=jobs_dir) as job:
        with pytest.raises(SystemExit) as exit_info:
            control.main(["--jobs-dir", str(jobs_dir), "abort", job.job_id, "--timeout", timeout])
        assert exit_info.value.code == 2 and "--timeout" in capsys.readouterr().err
        time.sleep(0.2)
        assert job.poll() is None  # the job never heard of it
