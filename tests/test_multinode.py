"""Two nodes on one machine: two `accelerate launch` of accelerate_configs/multinode.yaml with machine_rank 0 and 1
on 127.0.0.1 (gloo, one process per node), as the README tells users to edit it per node.

They train as one process does; and when a node dies, hangs, fails inside the loop or is refused its start, the
other ends promptly (within --dist-timeout at worst) with one line naming the newest complete checkpoint, and the
same command on both nodes resumes exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lifecycle.outdir import OutputDirLock
from tests.helpers import ACCELERATE, PYTHON, ROOT, TINY, train, train_losses, write_corpus
from tests.test_distributed import assert_same_run, grad_norms

pytestmark = pytest.mark.slow
MAX_NORM = "0.3"  # below every step's gradient norm here: clipping acts at each step (assert_same_run checks)
STEPS = "24"  # long enough that a kill lands mid-run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import data

    root = tmp_path_factory.mktemp("nodes")
    corpus = write_corpus(root / "docs.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), root / "tokenizer")
    common = [*TINY, "--dataset", str(corpus), "--tokenizer", str(root / "tokenizer"), "--max-grad-norm", MAX_NORM]
    return root, common


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """Two launchers, node 0 and node 1, of one run; each node's output goes to its own log file."""

    def __init__(self, root: Path, name: str, args: list[str], node1_args: list[str] | None = None):
        self.logs = [root / f"{name}-node{rank}.log" for rank in (0, 1)]
        port = str(free_port())
        env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.procs = []
        for rank, log in enumerate(self.logs):
            cmd = [
                PYTHON, "-m", "accelerate.commands.launch",
                "--config_file", str(ROOT / "accelerate_configs/multinode.yaml"),
                "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                "--num_machines", "2", "--num_processes", "2",
                str(ROOT / "train.py"), *(node1_args if rank == 1 and node1_args else args),
            ]  # fmt: skip
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))

    def wait(self, rank: int, timeout: float) -> tuple[int, float]:
        start = time.monotonic()
        return self.procs[rank].wait(timeout=timeout), time.monotonic() - start

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def signal_node(self, rank: int, sig: int) -> None:
        """`sig` to a node's launcher and every process under it (the workers run in their own sessions)."""
        for pid in reversed(process_tree(self.procs[rank].pid)):
            os.kill(pid, sig)

    def kill_all(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.poll() is None:
                self.signal_node(rank, signal.SIGKILL)
                proc.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo += children.get(tree[-1], [])
    return tree


def wait_for(path: Path, nodes: Nodes, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in nodes.procs), nodes.output(0)[-3000:] + nodes.output(1)[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def our_lines(output: str, start: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(start)]


def no_traceback_of_ours(output: str) -> bool:
    """The launcher prints its own report of a failed worker; train.py itself must print no traceback."""
    return 'train.py", line' not in output


def rank_exit_codes(output: str) -> list[int]:
    """The exit codes of a node's failed workers, from the launcher's report."""
    return [int(code) for code in re.findall(r"^\s*exitcode\s+: (-?\d+)", output, re.MULTILINE)]


def test_two_nodes_train_as_one_process(setup):
    root, common = setup
    one = root / "one"
    assert train(*common, "--batch-size", "4", "--max-steps", "6", "--output-dir", str(one)).returncode == 0
    nodes = Nodes(root, "two", [*common, "--batch-size", "2", "--max-steps", "6", "--output-dir", str(root / "two")])
    try:
        for rank in (0, 1):
            assert nodes.wait(rank, 300)[0] == 0, nodes.output(rank)[-3000:]
    finally:
        nodes.kill_all()
    assert_same_run(root / "two", one)
    assert "Hugging Face model:" in nodes.output(0)
    plan = [line for rank in (0, 1) for line in nodes.output(rank).splitlines() if line.startswith("global batch")]
    assert len(plan) == 1  # one plan per launch, from the main process, whatever the number of nodes


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """Two nodes, STEPS steps without a failure: what every resumed run must reproduce."""
    root, common = setup
    out = root / "uninterrupted"
    nodes = Nodes(root, "uninterrupted", [*common, "--batch-size", "2", "--max-steps", STEPS, "--output-dir", str(out)])
    try:
        for rank in (0, 1):
            assert nodes.wait(rank, 300)[0] == 0, nodes.output(rank)[-3000:]
    finally:
        nodes.kill_all()
    return out


def resume_both(root: Path, common: list[str], out: Path, uninterrupted: Path, name: str) -> None:
    nodes = Nodes(root, name, [*common, "--batch-size", "2", "--max-steps", STEPS, "--output-dir", str(out)])
    try:
        for rank in (0, 1):
            assert nodes.wait(rank, 300)[0] == 0, nodes.output(rank)[-3000:]
    finally:
        nodes.kill_all()
    assert "resumed from" in nodes.output(0)
    assert train_losses(out) == train_losses(uninterrupted)  # bit-identical, every step
    assert grad_norms(out) == grad_norms(uninterrupted)


def newest_named(line: str) -> Path:
    return Path(line.split("newest complete checkpoint: ")[1].split(";")[0])


def test_a_killed_node_ends_the_other_at_once_and_both_resume_exactly(setup, uninterrupted):
    root, common = setup
    out = root / "killed"
    nodes = Nodes(root, "killed", [*common, "--batch-size", "2", "--max-steps", STEPS, "--output-dir", str(out)])
    try:
        wait_for(out / "checkpoints/checkpoint-6", nodes)
        nodes.signal_node(1, signal.SIGSTOP)  # frozen first: the run cannot finish before the kill lands
        assert nodes.procs[0].poll() is None
        nodes.signal_node(1, signal.SIGKILL)
        code, seconds = nodes.wait(0, 120)
    finally:
        nodes.kill_all()
    output = nodes.output(0)
    lines = our_lines(output, "error: another process of the run is gone")
    assert code != 0 and seconds < 30 and len(lines) == 1, output[-3000:]
    assert no_traceback_of_ours(output), output[-3000:]
    assert rank_exit_codes(output) == [1]
    newest = newest_named(lines[0])
    assert newest.parent == out / "checkpoints" and (newest / "COMPLETE").exists()
    assert int(newest.name.split("-")[1]) >= 6
    assert "run the same command again on every node" in lines[0]
    resume_both(root, common, out, uninterrupted, "killed-resume")


def test_a_hung_node_ends_the_other_after_dist_timeout(setup, uninterrupted):
    root, common = setup
    out = root / "hung"
    args = [*common, "--batch-size", "2", "--max-steps", STEPS, "--output-dir", str(out), "--dist-timeout", "8"]
    nodes = Nodes(root, "hung", args)
    try:
        wait_for(out / "checkpoints/checkpoint-6", nodes)
        nodes.signal_node(1, signal.SIGSTOP)  # a node that stops answering without closing its connections
        code, seconds = nodes.wait(0, 120)
        assert nodes.procs[1].poll() is None  # still hung: the other node did not wait for it
    finally:
        nodes.kill_all()
    output = nodes.output(0)
    lines = our_lines(output, "error: another process of the run stopped answering")
    assert code != 0 and len(lines) == 1, output[-3000:]
    assert 8 <= seconds < 40, seconds  # the timeout set, not torch's 30 minutes
    assert "--dist-timeout, 8 s" in lines[0] and no_traceback_of_ours(output)
    assert (newest_named(lines[0]) / "COMPLETE").exists()
    resume_both(root, common, out, uninterrupted, "hung-resume")


def test_a_rank_that_fails_inside_the_loop_ends_every_rank(setup):
    """Rank 0's save fails mid-run (its checkpoints/ folder replaced by a file): it reports its own failure, and
    the rank on the other node, waiting for it in a collective, ends at once with its one line."""
    root, common = setup
    out = root / "raises"
    nodes = Nodes(root, "raises", [*common, "--batch-size", "2", "--max-steps", "400", "--output-dir", str(out)])
    try:
        wait_for(out / "checkpoints/checkpoint-6", nodes)
        (out / "checkpoints").rename(out / "checkpoints.moved")
        (out / "checkpoints").write_text("not a folder")
        code0, _ = nodes.wait(0, 120)
        code1, seconds1 = nodes.wait(1, 60)
    finally:
        nodes.kill_all()
    out0, out1 = nodes.output(0), nodes.output(1)
    assert code0 != 0 and rank_exit_codes(out0) == [1], out0[-3000:]
    assert len(our_lines(out0, "error: training failed (traceback above)")) == 1, out0[-3000:]
    assert len(our_lines(out1, "error: another process of the run is gone")) == 1, out1[-3000:]
    assert code1 != 0 and rank_exit_codes(out1) == [1] and no_traceback_of_ours(out1), out1[-3000:]
    assert "step 7/400" in out0 and "step 400/400" not in out0  # it failed inside the loop


def test_a_refusal_only_rank_0_makes_refuses_every_rank(setup):
    """Only rank 0 takes the output dir's lock: a busy lock must refuse the start on both nodes, exit 2, at once."""
    root, common = setup
    out = root / "busy"
    out.mkdir()
    lock = OutputDirLock(out).acquire()  # another run holds it
    try:
        nodes = Nodes(root, "busy", [*common, "--batch-size", "2", "--max-steps", "6", "--output-dir", str(out)])
        try:
            results = [nodes.wait(rank, 120) for rank in (0, 1)]
        finally:
            nodes.kill_all()
    finally:
        lock.release()
    for rank, (code, seconds) in enumerate(results):
        output = nodes.output(rank)
        refusals = our_lines(output, "error: ")
        assert code != 0 and len(refusals) == 1 and "is in use by another run" in refusals[0], output[-3000:]
        assert rank_exit_codes(output) == [2] and no_traceback_of_ours(output), output[-3000:]
        assert seconds < 60
    assert not (out / "checkpoints").exists()


def test_a_dry_run_under_a_launcher_prints_one_plan():
    """`accelerate launch ... --dry-run` starts a process per rank: the plan is printed once, by the main one."""
    result = train("--dry-run", "--model", "tiny", "--max-length", "64", launcher=ACCELERATE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("global batch") == 1 and result.stdout.count("memory (estimate") == 1, result.stdout
