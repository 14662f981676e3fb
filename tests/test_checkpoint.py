"""Checkpoint files: atomic completion marker, checksums, damaged-checkpoint skipping, retention, tied weights."""

import json
from pathlib import Path

import torch

from monitor import checkpoint as ckpt


def _save(root: Path, step: int, eval_loss: float | None = None) -> Path:
    weight = torch.randn(4, 3)
    state = {"embed.weight": weight, "head.weight": weight, "norm.weight": torch.ones(3)}  # head tied to embed
    return ckpt.save_checkpoint(
        root,
        step,
        rank=0,
        barrier=lambda: None,
        model_state=state,
        optimizer_state={"state": {}, "param_groups": []},
        trainer_state={"step": step, "eval_loss": eval_loss},
        rank_state={"rng": ckpt.capture_rng()},
    )


def test_checkpoint_round_trip_keeps_ties_and_verifies(tmp_path):
    path = _save(tmp_path, 5)
    assert path.name == "checkpoint-5" and not list(tmp_path.glob(".tmp-*"))
    assert ckpt.verify(path) is None
    loaded = ckpt.load_checkpoint(path, rank=0)
    model = loaded["model_state"]
    assert torch.equal(model["embed.weight"], model["head.weight"])
    assert loaded["trainer_state"]["step"] == 5
    stored = json.loads((path / ckpt.MARKER).read_text())["files"]
    assert set(stored) == {"model.safetensors", "optimizer.pt", "trainer_state.json", "rank-0.json"}


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    (newest / "model.safetensors").write_bytes(bytes(data))
    (tmp_path / "checkpoint-3").mkdir()  # a folder without a marker (never produced by save, but be safe)
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "checkpoint-1"
    assert any("checkpoint-2" in w and "checksum" in w for w in warnings)
    assert any("checkpoint-3" in w and "marker" in w for w in warnings)


def test_an_interrupted_save_leaves_only_a_temporary_folder(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / ".tmp-checkpoint-2").mkdir()  # what a kill in the middle of a save leaves
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    _save(tmp_path, 2)  # the next save replaces the leftover
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert not list(tmp_path.glob(".tmp-*"))


def test_retention_keeps_the_limit_the_newest_and_the_best_two(tmp_path):
    losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 1.5, 5: 2.8, 6: 2.9, 7: 3.1}
    for step, loss in losses.items():
        _save(tmp_path, step, loss)
        ckpt.prune_checkpoints(tmp_path, limit=4)
    kept = sorted(step for step, _ in ckpt.checkpoint_dirs(tmp_path))
    assert kept == [2, 4, 6, 7]  # best two (2, 4), then the newest ones up to the limit


def test_rng_state_round_trips(tmp_path):
    state = json.loads(json.dumps(ckpt.capture_rng()))
    expected = torch.rand(3)
    ckpt.restore_rng(state)
    assert torch.equal(torch.rand(3), expected)
