"""FSDP2 on CPU: 2 gloo processes launched by Accelerate with cpu_fsdp.yaml, against 2-process DDP and one process.

The same global batch of 4 sequences (2 per rank), clipping active at every step; sharded checkpoints resume under
FSDP, one process and DDP, and FSDP resumes a DDP checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lifecycle import checkpoint as ckpt
from tests.helpers import PYTHON, ROOT, train, train_losses
from tests.test_distributed import ACCELERATE, ONE, TWO, assert_same_run, records, run, setup  # noqa: F401

pytestmark = pytest.mark.slow
FSDP = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_fsdp.yaml")]


@pytest.fixture(scope="module")
def ddp(setup):  # noqa: F811
    return run(setup, "ddp-6", *TWO, "--max-steps", "6", launcher=ACCELERATE)


@pytest.fixture(scope="module")
def fsdp_run(setup):  # noqa: F811
    root, common = setup
    out = root / "fsdp-6"
    result = train(*common, *TWO, "--init-model", "--max-steps", "6", "--output-dir", str(out), launcher=FSDP)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result.stdout


@pytest.fixture(scope="module")
def fsdp(fsdp_run):
    return fsdp_run[0]


def test_fsdp_matches_ddp_and_exports_the_gathered_weights(setup, ddp, fsdp_run):  # noqa: F811
    fsdp, stdout = fsdp_run
    assert "fsdp: 4 blocks and the root sharded over 2 processes (cpu)" in stdout
    assert_same_run(fsdp, ddp)  # losses 1e-6, grad norms 1e-6 (step 1) / 5e-5 relative, clipping at every step
    evals, ddp_evals = records(fsdp, "eval"), records(ddp, "eval")
    assert [e["step"] for e in evals] == [e["step"] for e in ddp_evals] == list(range(7))
    assert all(e["loss"] == pytest.approx(r["loss"], abs=1e-5) for e, r in zip(evals, ddp_evals, strict=True))
    for step in range(7):  # a text sample at every evaluation (every rank runs the forward, the main one prints)
        assert f"step {step} | eval loss" in stdout and "| sample: " in stdout

    # The checkpoint is sharded: one safetensors file per rank for weights and optimizer state, no pickles.
    last = fsdp / "checkpoints" / "checkpoint-6"
    assert sorted(p.name for p in (last / "model").iterdir()) == [
        f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)
    ]
    assert not list(last.glob("*.pt")) and not list(last.glob("model-*.safetensors"))
    # final/ (gathered on the main rank) equals the checkpoint read whole, and DDP's weights.
    import models

    saved = ckpt.load_checkpoint(last, rank=0)["model_state"]
    exported, _ = models.load_hf(fsdp / "final")
    ddp_final, _ = models.load_hf(ddp / "final")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
        assert torch.allclose(tensor, ddp_final.state_dict()[name], atol=1e-5), name
    # python export.py converts the sharded checkpoint into the very folder the run exported
    from export import convert

    converted = convert(last, fsdp.parent / f"{fsdp.name}-converted")
    files = sorted(p.relative_to(converted) for p in converted.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(fsdp / "final") for p in (fsdp / "final").rglob("*") if p.is_file())
    assert all((converted / f).read_bytes() == (fsdp / "final" / f).read_bytes() for f in files)


def test_fsdp_checkpoint_resumes_under_fsdp_one_process_and_ddp(setup, ddp, fsdp):  # noqa: F811
    root, _ = setup
    first = run(setup, "fsdp-3", *TWO, "--max-steps", "3", launcher=FSDP)
    shutil.rmtree(first / "final")
    copies = {kind: root / f"fsdp-3-then-{kind}" for kind in ("one", "ddp", "fsdp1")}
    for copy in copies.values():
        shutil.copytree(first, copy)
    run(setup, "fsdp-3", *TWO, "--max-steps", "6", fresh=False, launcher=FSDP)
    run(setup, "fsdp-3-then-one", *ONE, "--max-steps", "6", fresh=False)
    run(setup, "fsdp-3-then-ddp", *TWO, "--max-steps", "6", fresh=False, launcher=ACCELERATE)
    # FSDP on one process: every tensor re-cut from the 2-rank slices into one
    run(setup, "fsdp-3-then-fsdp1", *ONE, "--max-steps", "6", fresh=False, launcher=[*FSDP, "--num_processes", "1"])
    for out in (first, *copies.values()):
        assert_same_run(out, fsdp)  # steps 1-3 under FSDP, 4-6 under each layout, vs 6 uninterrupted FSDP steps
    assert_same_run(copies["ddp"], ddp)


def test_fsdp_resumes_a_ddp_checkpoint(setup, ddp):  # noqa: F811
    first = run(setup, "ddp-3-then-fsdp", *TWO, "--max-steps", "3", launcher=ACCELERATE)
    assert (first / "checkpoints" / "checkpoint-3" / "model-0.safetensors").is_file()  # the unsharded form
    run(setup, "ddp-3-then-fsdp", *TWO, "--max-steps", "6", fresh=False, launcher=FSDP)
    assert_same_run(first, ddp)


def test_activation_checkpointing_gives_the_same_losses(setup, fsdp):  # noqa: F811
    out = run(setup, "fsdp-ac", *TWO, "--max-steps", "6", "--activation-checkpointing", launcher=FSDP)
    assert_same_run(out, fsdp)


def test_sigkill_inside_a_sharded_save_leaves_the_previous_checkpoint_loadable(setup, tmp_path):  # noqa: F811
    root, common = setup
    out = tmp_path / "run"
    cmd = [*FSDP, str(ROOT / "train.py"), *common, *TWO, "--output-dir", str(out), "--max-steps", "40"]
    cmd += ["--step-cadence", "0.0002", "--eval-batches", "1", "--sample-tokens", "0"]  # a save at every step
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([*cmd, "--init-model"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, killed_in, killed = time.time() + 300, None, []
    while time.time() < deadline and proc.poll() is None:
        writing = [p for p in (out / "checkpoints").glob(".tmp-checkpoint-*/model/*") if p.name.startswith("shard")]
        done = ckpt.checkpoint_dirs(out / "checkpoints")
        if writing and done:  # a later save is under way while an earlier one is complete
            killed = _process_tree(proc.pid)
            for pid in killed:  # the launcher and both ranks at once, like a machine that dies
                os.kill(pid, signal.SIGKILL)
            killed_in = writing[0].parents[1].name
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_in is not None, "the run never reached a second save"
    while any(pid in _process_tree(pid) for pid in killed) and time.time() < deadline:  # until the ranks are gone
        time.sleep(0.05)
    assert (out / "checkpoints" / killed_in).is_dir()  # the interrupted save was left as a temporary folder
    newest = ckpt.latest_checkpoint(out / "checkpoints", warn=lambda m: None)
    assert newest is not None and int(newest.name.split("-")[1]) < int(killed_in.split("-")[-1])
    loaded = ckpt.load_checkpoint(newest, rank=0)  # whole tensors from the shards
    assert loaded["model_state"] and loaded["optimizer_state"]["state"]
    resumed = subprocess.run([*cmd, "--max-steps", "8"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {newest}" in resumed.stdout
    assert max(train_losses(out)) == 8
    assert not list(Path(out / "checkpoints").glob(".tmp-checkpoint-*"))  # the next save replaced the leftover


def _process_tree(root: int) -> list[int]:
    """root and all its live descendants (torch's launcher starts the ranks in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [], [root] if root in parents else []
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier += [child for child, parent in parents.items() if parent == pid]
    return tree


@pytest.mark.parametrize("optimizer,tolerance", [("adafactor", 5e-3), ("adamw", 1e-3)])
def test_bf16_under_fsdp_trains_and_resumes_like_one_process(setup, optimizer, tolerance):  # noqa: F811
    """Pure bf16 weights with Adafactor and stochastic rounding; bf16 autocast over fp32 weights with AdamW."""
    bf16 = ["--dtype", "bf16", "--optimizer", optimizer]
    single = run(setup, f"bf16-{optimizer}-one", *ONE, *bf16, "--max-steps", "4")
    split = optimizer == "adafactor"  # its sharded statistics go through a checkpoint; AdamW's did above in fp32
    out = run(setup, f"bf16-{optimizer}-fsdp", *TWO, *bf16, "--max-steps", "2" if split else "4", launcher=FSDP)
    last = sorted((out / "checkpoints").iterdir())[-1]
    weights = ckpt.load_checkpoint(last, rank=0)["model_state"]
    assert {t.dtype for t in weights.values()} == {torch.bfloat16 if optimizer == "adafactor" else torch.float32}
    if split:
        run(setup, f"bf16-{optimizer}-fsdp", *TWO, *bf16, "--max-steps", "4", fresh=False, launcher=FSDP)
    losses, reference = train_losses(out), train_losses(single)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in losses:  # bf16 rounding (and, for Adafactor, other random rounding draws) stay within tolerance
        assert losses[step] == pytest.approx(reference[step], abs=tolerance), step
