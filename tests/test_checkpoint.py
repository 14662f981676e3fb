"""Checkpoint files: atomic completion marker, checksums, damaged-checkpoint skipping, retention, tied weights."""

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lifecycle import checkpoint as ckpt
from lifecycle import replace
from optim.optimizers import load_optimizer_state_by_name, optimizer_state_by_name


def _state() -> dict[str, torch.Tensor]:
    weight = torch.randn(4, 3)
    return {"embed.weight": weight, "head.weight": weight, "norm.weight": torch.randn(3)}  # head tied to embed


def _save(
    root: Path, step: int, eval_loss: float | None = None, state: dict | None = None, start_id: str | None = None
) -> Path:
    return ckpt.save_checkpoint(
        root,
        step,
        rank=0,
        barrier=lambda: None,
        model_part=state or _state(),
        optimizer_part={"state": {"norm.weight": {"step": torch.tensor(3.0)}}, "extra": {}},
        trainer_state={"step": step, "eval_loss": eval_loss, "start_id": start_id},
        rank_state={"rng": ckpt.capture_rng()},
    )


def test_checkpoint_round_trip_keeps_ties_values_and_verifies(tmp_path):
    saved = _state()
    path = _save(tmp_path, 5, state=saved)
    assert path.name == "checkpoint-5" and not list(tmp_path.glob(".tmp-*"))
    assert ckpt.verify(path) is None
    loaded = ckpt.load_checkpoint(path, rank=0)
    model = loaded["model_state"]
    assert set(model) == set(saved)
    assert all(torch.equal(model[name], saved[name]) for name in saved)  # the values, not just the names
    assert model["embed.weight"].data_ptr() == model["head.weight"].data_ptr()  # still one tensor
    assert loaded["optimizer_state"]["state"]["norm.weight"]["step"] == 3.0
    assert loaded["trainer_state"]["step"] == 5
    stored = json.loads((path / ckpt.MARKER).read_text())["files"]
    assert set(stored) == {"model-0.safetensors", "optimizer-0.pt", "trainer_state.json", "rank-0.json"}
    assert set(ckpt.load_state_dict_file(path / "model-0.safetensors")) == set(saved)


def test_parts_written_by_pipeline_stages_merge_by_name(tmp_path):
    """Two ranks (stages) each write their part; loading merges them, a tied weight held by both counted once."""
    embed, block, head = torch.randn(4, 3), torch.randn(3, 3), torch.randn(3)
    parts = {0: {"embed.weight": embed, "layers.0.weight": block}, 1: {"embed.weight": embed, "norm.weight": head}}
    root = tmp_path / "checkpoints"
    optimizer = {
        0: {"state": {"layers.0.weight": {"exp_avg": torch.zeros(3, 3)}}, "extra": {}},
        1: {"state": {"norm.weight": {"exp_avg": torch.ones(3)}}, "extra": {"gen": torch.tensor([1])}},
    }
    barrier = threading.Barrier(2, timeout=30)  # two ranks as two threads, meeting where processes would

    def save(rank: int) -> None:
        ckpt.save_checkpoint(
            root,
            1,
            rank=rank,
            barrier=barrier.wait,
            model_part=parts[rank],
            optimizer_part=optimizer[rank],
            trainer_state={"step": 1} if rank == 0 else None,
            rank_state={},
        )

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(save, (0, 1)))
    path = root / "checkpoint-1"
    assert ckpt.verify(path) is None
    merged = ckpt.load_checkpoint(path, rank=1)
    assert set(merged["model_state"]) == {"embed.weight", "layers.0.weight", "norm.weight"}
    assert torch.equal(merged["model_state"]["norm.weight"], head)
    assert set(merged["optimizer_state"]["state"]) == {"layers.0.weight", "norm.weight"}
    assert torch.equal(merged["optimizer_state"]["extra"]["gen"], torch.tensor([1]))  # rank 1 gets its own extras


def test_optimizer_state_by_name_moves_between_layouts():
    """AdamW state saved from a whole model loads into a 'stage' holding a subset of its parameters, and back."""
    torch.manual_seed(0)
    whole = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(whole.parameters(), lr=0.1)
    whole(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = {p: n for n, p in whole.named_parameters()}
    saved = optimizer_state_by_name(opt, names)
    assert set(saved["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    stage = torch.nn.Linear(4, 2)  # plays the second stage: holds "1.*" only
    stage_opt = torch.optim.AdamW(stage.parameters(), lr=0.1)
    stage_names = {stage.weight: "1.weight", stage.bias: "1.bias"}
    load_optimizer_state_by_name(stage_opt, saved, stage_names)
    for p, name in stage_names.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(
                stage_opt.state[p][key], opt.state[whole[1].weight if "weight" in name else whole[1].bias][key]
            )
    with pytest.raises(ValueError, match="no optimizer state for"):
        load_optimizer_state_by_name(stage_opt, {"state": {"0.weight": {}}, "extra": {}}, stage_names)


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    data = bytearray((newest / "model-0.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    (newest / "model-0.safetensors").write_bytes(bytes(data))
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


def test_retention_ranks_a_nan_eval_loss_worst(tmp_path):
    for step, loss in {1: 2.0, 2: 1.5, 3: math.nan, 4: math.nan, 5: math.nan}.items():
        _save(tmp_path, step, loss)
        ckpt.prune_checkpoints(tmp_path, limit=3)
    assert sorted(step for step, _ in ckpt.checkpoint_dirs(tmp_path)) == [1, 2, 5]  # the finite best two survive


def test_a_damaged_checkpoint_with_its_marker_is_written_again(tmp_path):
    path = _save(tmp_path, 4)
    (path / "trainer_state.json").write_text("{}")  # damaged after its marker was written
    assert ckpt.verify(path) is not None
    _save(tmp_path, 4)
    assert ckpt.verify(path) is None


def test_rng_state_round_trips(tmp_path):
    state = json.loads(json.dumps(ckpt.capture_rng()))
    expected = torch.rand(3)
    ckpt.restore_rng(state)
    assert torch.equal(torch.rand(3), expected)


# -----------------------------------------------------------------------------
# --init-model --overwrite-output-dir: the old run set aside, then put back or deleted, cut short at every move


def _old_run(out: Path) -> dict[str, bytes]:
    _save(out / "checkpoints", 3, start_id="old")
    for name in ("tokenizer", "final"):
        (out / name).mkdir(parents=True)
        (out / name / "tokenizer.json").write_text('{"old": true}')
    return _tree(out)


def _tree(out: Path) -> dict[str, bytes]:
    """Every file of the run, relative to where it belongs (.replaced/ counted as its place, its record left out)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != replace.REPLACED_BY:
            rel = p.relative_to(out).as_posix()
            files[rel.removeprefix(replace.REPLACED + "/")] = p.read_bytes()
    return files


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, renames: int) -> None:
    real, count = ckpt.os.rename, [0]

    def rename(src, dst):
        if count[0] == renames:
            raise _Killed
        count[0] += 1
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)


NAMES = ["checkpoints", "final", "tokenizer"]


def test_a_new_folder_sets_nothing_aside(tmp_path):
    assert not replace.set_aside(tmp_path, NAMES, "new")
    assert not (tmp_path / replace.REPLACED).exists() and replace.settle_replaced(tmp_path) is None


@pytest.mark.parametrize("renames", [0, 1, 2])
def test_a_kill_while_setting_aside_never_loses_the_old_run(tmp_path, monkeypatch, renames):
    old = _old_run(tmp_path)
    _kill_after(monkeypatch, renames)
    with pytest.raises(_Killed):
        replace.set_aside(tmp_path, ["tokenizer", "final", "checkpoints"], "new")
    monkeypatch.undo()
    problem = replace.settle_replaced(tmp_path)
    assert _tree(tmp_path) == old  # every file still there, in place or in .replaced/
    if renames == 0:  # nothing moved yet: the run is whole where it was
        assert problem is None and not (tmp_path / replace.REPLACED).exists()
    else:  # the checkpoints moved first: refused, naming .replaced/
        assert replace.REPLACED in problem and (tmp_path / replace.REPLACED / "checkpoints").is_dir()


@pytest.mark.parametrize("renames", [0, 1, 2])
def test_an_error_while_setting_aside_is_put_back_whole(tmp_path, monkeypatch, renames):
    old = _old_run(tmp_path)  # e.g. a second stop signal between two renames: train.py's finally puts back
    _kill_after(monkeypatch, renames)
    with pytest.raises(_Killed):
        replace.set_aside(tmp_path, NAMES, "new")
    monkeypatch.undo()
    assert replace.put_back(tmp_path, "new")
    assert not (tmp_path / replace.REPLACED).exists() and _tree(tmp_path) == old


@pytest.mark.parametrize("renames", [0, 1, 2, 3])
def test_a_kill_while_putting_back_never_loses_the_old_run(tmp_path, monkeypatch, renames):
    old = _old_run(tmp_path)
    assert replace.set_aside(tmp_path, NAMES, "new")
    for name in ("tokenizer", "final"):  # the new run's tokenizer and export, and its unfinished first save
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text('{"new": true}')
    (tmp_path / "checkpoints" / ".tmp-checkpoint-3").mkdir(parents=True)
    _kill_after(monkeypatch, renames)
    if renames < 3:
        with pytest.raises(_Killed):
            replace.put_back(tmp_path, "new")
    else:
        assert replace.put_back(tmp_path, "new")
    monkeypatch.undo()
    problem = replace.settle_replaced(tmp_path)
    if problem is None:  # settled: the old run is whole in place, the new tokenizer and export gone
        assert renames == 3 and _tree(tmp_path) == old and not (tmp_path / replace.REPLACED).exists()
    else:  # the old checkpoints are still aside: nothing of the old run deleted
        assert (tmp_path / replace.REPLACED / "checkpoints" / "checkpoint-3").is_dir()
        for name in ("tokenizer", "final"):
            aside = tmp_path / replace.REPLACED / name / "tokenizer.json"
            assert (aside if aside.exists() else tmp_path / name / "tokenizer.json").read_text() == '{"old": true}'


def test_after_the_new_runs_first_checkpoint_the_old_run_is_deleted(tmp_path):
    _old_run(tmp_path)
    assert replace.set_aside(tmp_path, NAMES, "new")
    _save(tmp_path / "checkpoints", 1, start_id="new")  # the new run's first checkpoint; killed before the drop
    assert replace.settle_replaced(tmp_path) is None
    assert not (tmp_path / replace.REPLACED).exists()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "checkpoint-1"


def test_a_failure_after_the_new_runs_first_checkpoint_keeps_the_new_run(tmp_path):
    _old_run(tmp_path)
    assert replace.set_aside(tmp_path, NAMES, "new")
    new = _save(tmp_path / "checkpoints", 1, start_id="new")  # complete; the run then failed before the drop
    assert not replace.put_back(tmp_path, "new")  # nothing put back over the new run's checkpoint
    assert not (tmp_path / replace.REPLACED).exists() and ckpt.latest_checkpoint(tmp_path / "checkpoints") == new


def test_only_the_replacing_starts_checkpoint_lets_a_start_delete_what_was_set_aside(tmp_path):
    old = _old_run(tmp_path)
    assert replace.set_aside(tmp_path, NAMES, "new")
    os.rename(tmp_path / replace.REPLACED / "checkpoints", tmp_path / "checkpoints")  # the old checkpoints moved back
    assert replace.REPLACED in replace.settle_replaced(tmp_path)  # by hand; tokenizer and export still aside
    assert replace.put_back(tmp_path, "new") and _tree(tmp_path) == old  # its own start puts the rest back
    assert replace.set_aside(tmp_path, NAMES, "new")
    _save(tmp_path / "checkpoints", 1, start_id="another start")  # a complete checkpoint, but not the replacer's
    assert replace.REPLACED in replace.settle_replaced(tmp_path)
    assert {k: v for k, v in _tree(tmp_path).items() if "checkpoint-1" not in k} == old


def test_a_replaced_folder_this_project_did_not_make_is_refused_and_kept(tmp_path):
    _old_run(tmp_path)
    (tmp_path / replace.REPLACED).mkdir()
    (tmp_path / replace.REPLACED / "notes.txt").write_text("mine")
    assert "no start of this project" in replace.settle_replaced(tmp_path)
    assert (tmp_path / replace.REPLACED / "notes.txt").read_text() == "mine"
    (tmp_path / replace.REPLACED / "notes.txt").unlink()
    (tmp_path / replace.REPLACED).rmdir()
    (tmp_path / replace.REPLACED).write_text("a file")
    assert "not a folder this project made" in replace.settle_replaced(tmp_path)
    (tmp_path / replace.REPLACED).unlink()
    (tmp_path / replace.REPLACED).symlink_to(tmp_path / "checkpoints")
    assert "not a folder this project made" in replace.settle_replaced(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is not None


def test_a_kill_while_dropping_leaves_nothing_half_deleted(tmp_path, monkeypatch):
    _old_run(tmp_path)
    assert replace.set_aside(tmp_path, NAMES, "new")
    new = _save(tmp_path / "checkpoints", 1, start_id="new")
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        replace.drop_replaced(tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / replace.REPLACED).exists()  # renamed out of the way before any file went
    assert replace.settle_replaced(tmp_path) is None and not (tmp_path / (replace.REPLACED + ".dropping")).exists()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == new


@pytest.mark.parametrize("published", [False, True])
def test_an_export_without_a_checkpoint_completes_the_replacement_once_published(tmp_path, published):
    old = _old_run(tmp_path)  # --save-strategy no: the export is the new run's only proof
    assert replace.set_aside(tmp_path, NAMES, "new")
    staging = tmp_path / ".tmp-final"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"new weights")
    replace.mark_export(tmp_path, "new", staging / "model.safetensors")
    if published:  # killed after publish_dir renamed it into place, before the drop
        os.rename(staging, tmp_path / "final")
        assert replace.settle_replaced(tmp_path) is None and not (tmp_path / replace.REPLACED).exists()
        assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"new weights"
    else:  # killed before: the old run, its export included, is still whole in .replaced/
        assert replace.REPLACED in replace.settle_replaced(tmp_path)
        assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith(".tmp-final")} == old
        (tmp_path / "final").mkdir()  # an unrelated file of the same name and size is no proof
        (tmp_path / "final" / "model.safetensors").write_bytes(b"new weights")
        assert replace.REPLACED in replace.settle_replaced(tmp_path)


def test_a_dropping_folder_that_is_not_ours_is_refused_and_kept(tmp_path):
    _old_run(tmp_path)
    doomed = tmp_path / (replace.REPLACED + ".dropping")
    doomed.write_text("mine")
    assert "not a folder this project made" in replace.settle_replaced(tmp_path)
    assert replace.set_aside(tmp_path, NAMES, "new")
    _save(tmp_path / "checkpoints", 1, start_id="new")
    replace.drop_replaced(tmp_path)  # deletes what it set aside in place, leaves the stranger alone
    assert not (tmp_path / replace.REPLACED).exists() and doomed.read_text() == "mine"


def test_weight_files_get_the_umask_permissions_like_every_other_file(tmp_path):
    """safetensors creates files 0600; a run's weights must be as readable as its other files (umask-derived)."""
    import stat

    from models.hf import save_weights

    old = os.umask(0o027)
    try:
        ckpt.save_state_dict({"w": torch.zeros(2)}, tmp_path / "checkpoint.safetensors")
        save_weights({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"checkpoint.safetensors": 0o640, "model.safetensors": 0o640, "plain.json": 0o640}


@pytest.mark.parametrize("marker", ["[]", '{"files": null}', '{"files": {}}', '{"files": {"rank-0.json": 3}}', "{"])
def test_a_completion_marker_of_the_wrong_shape_is_damage_and_the_older_checkpoint_resumes(tmp_path, marker):
    older, newer = _save(tmp_path, 3), _save(tmp_path, 6)
    (newer / ckpt.MARKER).write_text(marker)
    warnings = []
    assert ckpt.verify(newer) is not None
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append) == older
    assert len(warnings) == 1 and "checkpoint-6" in warnings[0]


def test_what_a_kill_inside_a_discard_left_is_cleared_and_never_blocks_the_next_discard(tmp_path):
    """A kill between a rollback's rename and its delete leaves `.abandoned-checkpoint-N`: the next start clears it,
    and a later discard of the same step (the history abandoned again) replaces it instead of failing."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / ".abandoned-checkpoint-2").mkdir()
    (tmp_path / ".abandoned-checkpoint-2" / "model-0.safetensors").write_bytes(b"half deleted")
    keeper = ckpt.Checkpointer(tmp_path, rank=0, barrier=lambda: None, keep=4, contents=None)
    assert keeper.discard_after(1) == [tmp_path / "checkpoint-2"]
    assert [p.name for _, p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    (tmp_path / ".abandoned-checkpoint-7").mkdir()
    (tmp_path / ".tmp-checkpoint-8").mkdir()
    assert sorted(p.name for p in ckpt.clear_staging(tmp_path)) == [".abandoned-checkpoint-7", ".tmp-checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
