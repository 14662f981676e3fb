"""Command line for job control: ``python -m monitor control list | save JOB | stop JOB | abort JOB``.

(``python -m lifecycle.control ...`` is the same.) ``save`` asks a running job to write a checkpoint now and carry
on, ``stop`` to save and exit cleanly, ``abort`` to exit at once without saving. JOB is a job id from ``list``,
a unique prefix of one, or the job's pid. The job side is ``lifecycle.jobs.JobControl``.
"""

import argparse
import sys
import time
from pathlib import Path

from console import ArgumentParser
from lifecycle.jobs import COMMANDS, JobControl, find_job, list_jobs, send_command

__all__ = ["JobControl", "main"]


def _timeout(text: str) -> float:
    """--timeout: seconds in (0, 3600], checked before anything is sent (a refused value must act on nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} is out of range; expected seconds > 0 and <= 3600")
    return value


def build_parser(prog: str = "python -m lifecycle.control") -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description="List running training jobs and send them commands.")
    parser.add_argument("--jobs-dir", type=Path, default=None, help="registration directory (default: per user)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list running jobs (and forget dead ones)")
    helps = {"save": "save a checkpoint now", "stop": "save, then exit", "abort": "exit now without saving"}
    for command in COMMANDS:
        p = sub.add_parser(command, help=helps[command])
        p.add_argument("job", help="job id (or a unique prefix of it, or its pid)")
        p.add_argument("--timeout", type=_timeout, default=30.0, help="seconds to wait for the job's reply")
    return parser


def _print_jobs(jobs: list[dict]) -> None:
    if not jobs:
        print("no running jobs")
        return
    rows = [("JOB", "PID", "HOST", "STARTED", "OUTPUT DIR")]
    for info in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        rows.append((info["job_id"], str(info["pid"]), info.get("host", "?"), started, info.get("output_dir", "?")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])


def main(argv: list[str] | None = None, prog: str = "python -m lifecycle.control") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "list":
            _print_jobs(list_jobs(args.jobs_dir))
            return 0
        job_id = find_job(args.job, args.jobs_dir)["job_id"]
        reply = send_command(job_id, args.command, args.jobs_dir, timeout=args.timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        list_jobs(args.jobs_dir)  # forgets the job if its process is gone
        print(f"error: {e}", file=sys.stderr)
        return 1
    if reply is None:
        print(
            f"sent {args.command} to {job_id}; no reply within {args.timeout:g}s (it may be evaluating or saving), "
            "it will act on it when it next checks"
        )
        return 0
    print(reply)
    return 0 if reply.startswith("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
