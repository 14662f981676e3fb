"""Job control for running trainings: ask a job to save a checkpoint now, stop (save, then exit) or abort.

Each training job (its main rank) registers itself in a per-user jobs directory:

    $XDG_RUNTIME_DIR/small-llm-jobs/     (or ~/.cache/small-llm/jobs, or $SMALL_LLM_JOBS_DIR)
        <job_id>.json    pid, user, host, output directory, start time, socket path
        <job_id>.sock    a Unix domain socket the job reads one-line commands from

Security: the directory must be owned by the current user with no group/other permissions (0700), otherwise it is
refused, so other users can neither read the registrations nor reach the sockets. On Linux the job additionally
checks the connecting process's uid (SO_PEERCRED) and refuses commands from anyone but its own user.

The job reads commands only when the training loop calls ``poll()`` (every step; a non-blocking ``accept`` is a
single cheap system call), so a command sent while it evaluates or saves is answered when it gets back to training.
The client side (``list_jobs``, ``send_command``) backs ``python -m monitor control ...``.
"""

import json
import os
import re
import socket
import stat
import struct
import time
from collections import deque
from pathlib import Path

COMMANDS = ("save", "stop", "abort")
_MAX_REQUEST = 64  # bytes; a command line is a few characters
_REQUEST_TIMEOUT = 5.0  # seconds a connected client may take to send its line before it is dropped


def default_jobs_dir() -> Path:
    """Where jobs register: $SMALL_LLM_JOBS_DIR, else $XDG_RUNTIME_DIR/small-llm-jobs, else ~/.cache/small-llm/jobs."""
    if os.environ.get("SMALL_LLM_JOBS_DIR"):
        return Path(os.environ["SMALL_LLM_JOBS_DIR"])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "small-llm-jobs"
    return Path.home() / ".cache" / "small-llm" / "jobs"


def private_jobs_dir(jobs_dir: Path | None = None, *, create: bool = False) -> Path | None:
    """The jobs directory after checking it is private to this user; None if it does not exist and not ``create``."""
    path = Path(jobs_dir) if jobs_dir is not None else default_jobs_dir()
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"jobs directory {path} is not a directory (or is a symlink); remove it or pick another.")
    if info.st_uid != os.getuid():
        raise ValueError(f"jobs directory {path} belongs to uid {info.st_uid}, not you; refusing to use it.")
    if info.st_mode & 0o077:
        raise ValueError(
            f"jobs directory {path} is accessible to other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod 700 {path}`."
        )
    return path


def _peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process on the other end of a Unix socket, where the OS tells us (Linux)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class JobControl:
    """The training side: registers this job and turns incoming commands into ``poll()`` results.

    Create it on the main rank only (or pass ``enabled=False`` elsewhere) and broadcast what ``poll`` returns.
    The job id is ``<job_name>-<pid>``, e.g. ``llama-360m-48213``.
    """

    def __init__(self, output_dir: Path, job_name: str, *, enabled: bool = True, jobs_dir: Path | None = None) -> None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", job_name).strip("-")[:32] or "job"
        self.job_id = f"{name}-{os.getpid()}"
        self._server: socket.socket | None = None
        self._pending: list[list] = []  # [connection, bytes received, time accepted]
        self._commands: deque[str] = deque()
        self.info: dict = {}
        if not enabled:
            return
        directory = private_jobs_dir(jobs_dir, create=True)
        list_jobs(directory)  # forget the registrations of jobs that died without unregistering
        self.socket_path = directory / f"{self.job_id}.sock"
        self.info_path = directory / f"{self.job_id}.json"
        if len(os.fsencode(self.socket_path)) > 100:
            raise ValueError(
                f"socket path {self.socket_path} is too long for a Unix socket; set SMALL_LLM_JOBS_DIR to a shorter "
                "directory."
            )
        self.socket_path.unlink(missing_ok=True)  # left by an earlier process with the same pid
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._server.listen(8)
        self._server.setblocking(False)
        self.info = {
            "job_id": self.job_id,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "user": _user_name(),
            "host": socket.gethostname(),
            "output_dir": str(Path(output_dir).resolve()),
            "started": time.time(),
            "socket": str(self.socket_path),
        }
        tmp = self.info_path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        os.replace(tmp, self.info_path)

    def poll(self) -> str | None:
        """The next command received ("save" | "stop" | "abort"), or None; never blocks."""
        if self._server is None:
            return None
        while len(self._pending) < 8:
            try:
                conn, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                break
            conn.setblocking(False)
            self._pending.append([conn, b"", time.monotonic()])
        for entry in list(self._pending):
            conn, received, accepted = entry
            try:
                chunk = conn.recv(_MAX_REQUEST)
            except (BlockingIOError, InterruptedError):
                chunk = None
            except OSError:
                chunk = b""
            if chunk:
                entry[1] = received = received + chunk
            complete = b"\n" in received or chunk == b"" or len(received) >= _MAX_REQUEST
            if not complete and time.monotonic() - accepted < _REQUEST_TIMEOUT:
                continue
            self._pending.remove(entry)
            reply = self._handle(conn, received)
            try:
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass  # the client gave up waiting; the command still counts
            conn.close()
        return self._commands.popleft() if self._commands else None

    def _handle(self, conn: socket.socket, request: bytes) -> str:
        uid = _peer_uid(conn)
        if uid is not None and uid != os.getuid():
            return f"refused: job {self.job_id} belongs to another user"
        command = request.decode(errors="replace").strip()
        if command not in COMMANDS:
            return f"error: unknown command {command[:20]!r}; expected one of {', '.join(COMMANDS)}"
        self._commands.append(command)
        return f"ok: {command} requested for {self.job_id}"

    def close(self) -> None:
        """Unregister: remove the socket and the registration file."""
        if self._server is None:
            return
        for conn, _, _ in self._pending:
            conn.close()
        self._pending.clear()
        self._server.close()
        self._server = None
        self.socket_path.unlink(missing_ok=True)
        self.info_path.unlink(missing_ok=True)

    def __enter__(self) -> "JobControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_jobs(jobs_dir: Path | None = None, *, clean: bool = True) -> list[dict]:
    """Registered jobs, oldest first; registrations of dead processes on this host are removed when ``clean``."""
    directory = private_jobs_dir(jobs_dir)
    if directory is None:
        return []
    host = socket.gethostname()
    jobs = []
    for path in sorted(directory.glob("*.json")):
        try:
            info = json.loads(path.read_text())
            pid, sock = int(info["pid"]), Path(info["socket"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if info.get("host") == host and not (_pid_alive(pid) and sock.exists()):
            if clean:
                sock.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            continue
        jobs.append(info)
    return sorted(jobs, key=lambda info: info.get("started", 0))


def find_job(job: str, jobs_dir: Path | None = None) -> dict:
    """The running job named by its id, a unique prefix of it, or its pid; ValueError if none or several match."""
    if not job.strip():
        raise ValueError("the job id is empty; `python -m monitor control list` shows the running jobs.")
    jobs = list_jobs(jobs_dir)
    exact = [info for info in jobs if job in (info["job_id"], str(info["pid"]))]
    matches = exact or [info for info in jobs if info["job_id"].startswith(job)]
    if not matches:
        raise ValueError(f"unknown job {job!r}; `python -m monitor control list` shows the running jobs.")
    if len(matches) > 1:
        raise ValueError(f"{job!r} matches several jobs ({', '.join(m['job_id'] for m in matches)}); be more specific.")
    return matches[0]


def send_command(job: str, command: str, jobs_dir: Path | None = None, timeout: float = 30.0) -> str | None:
    """Send ``command`` to a job and return its one-line reply, or None if it did not answer within ``timeout``
    (the command stays queued and the job acts on it when it next polls). Raises ConnectionError if the job is gone.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}.")
    info = find_job(job, jobs_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(info["socket"])
        except (ConnectionRefusedError, FileNotFoundError) as e:
            raise ConnectionError(f"job {info['job_id']} is not accepting commands (it has exited?)") from e
        conn.sendall(command.encode() + b"\n")
        conn.settimeout(timeout)
        try:
            reply = conn.recv(1024)
        except TimeoutError:
            return None
    return reply.decode(errors="replace").strip() or None
