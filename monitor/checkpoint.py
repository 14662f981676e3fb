"""Crash-safe checkpoints: atomic writes, checksummed completion markers, retention, per-rank RNG state.

Layout of one checkpoint (``<output_dir>/checkpoints/checkpoint-<step>/``):

    model.safetensors     weights (tied tensors stored once)            written by the main rank
    optimizer.pt          optimizer state_dict, loaded weights_only     written by the main rank
    trainer_state.json    progress, schedule step, data state, args...  written by the main rank
    rank-<k>.json         RNG states of rank k                          written by every rank
    COMPLETE              JSON: file -> sha256, written last            written by the main rank

Everything is first written to ``.tmp-checkpoint-<step>/`` and renamed into place only when complete, so a kill at
any moment leaves either no new checkpoint or a complete one. Loading verifies the checksums and skips a damaged
checkpoint with a warning. Nothing is ever unpickled beyond plain tensors (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def dedupe_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key (tied embeddings); return (tensors, alias -> source)."""
    seen: dict[tuple[int, int, tuple], str] = {}
    tensors, aliases = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t.detach().contiguous().cpu()
    return tensors, aliases


def _plain(obj: Any) -> Any:
    """numpy arrays and scalars inside nested dicts -> lists and Python numbers."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj.item() if isinstance(obj, np.generic) else obj


def capture_rng() -> dict:
    """Every RNG this process uses, as JSON-able values."""
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": _plain(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        k: np.array(v, dtype=np.uint64) if isinstance(v, list) else v for k, v in np_state["state"].items()
    }
    np.random.set_state(np_state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """All ``checkpoint-<step>`` folders under root (complete or not), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and every checksum matches, else what is wrong."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable completion marker"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} fails its checksum"
    return None


def latest_checkpoint(root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest complete, verified checkpoint; damaged ones are skipped with a warning."""
    for _, path in checkpoint_dirs(root):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"warning: skipping damaged checkpoint {path}: {problem}")
    return None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    rank: int,
    barrier: Callable[[], None],
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    trainer_state: dict | None,
    rank_state: dict,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically. Every rank calls this; rank 0 passes the model/optimizer/trainer state.

    ``extra_files(tmp_dir)`` lets a caller (the pipeline engine) write more files into the temporary folder on every
    rank before the marker is written. If ``checkpoint-<step>`` already exists and verifies, nothing is rewritten: the
    state at a given step is the same after an exact resume.
    """
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    exists = (final / MARKER).is_file()  # the marker is written last, inside the folder renamed into place
    if rank == 0 and not exists:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a crash in the middle of a save
        if final.exists():
            shutil.rmtree(final)  # incomplete leftover under the final name (should not happen; be safe)
        tmp.mkdir(parents=True)
    barrier()
    if exists:
        return final
    if rank == 0:
        if model_state is not None:
            save_state_dict(model_state, tmp / "model.safetensors")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        _write_json(tmp / "trainer_state.json", trainer_state)
    _write_json(tmp / f"rank-{rank}.json", rank_state)
    if extra_files is not None:
        extra_files(tmp)
    barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _write_json(tmp / MARKER, {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}})
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    barrier()
    return final


def save_state_dict(state: dict[str, torch.Tensor], file: Path) -> None:
    """A state dict as safetensors, tensors that share storage (tied weights) stored once."""
    tensors, aliases = dedupe_state_dict(state)
    save_file(tensors, file, metadata={"aliases": json.dumps(aliases)})


def load_state_dict_file(file: Path) -> dict[str, torch.Tensor]:
    """Inverse of save_state_dict: tied aliases restored (so ``load_state_dict(strict=True)`` works)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(file))
    for alias, source in aliases.items():
        state[alias] = state[source]
    return state


def load_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Everything in a verified checkpoint for this rank; ``rank_state`` is None when the rank has no file."""
    rank_file = path / f"rank-{rank}.json"
    optimizer_file = path / "optimizer.pt"
    return {
        "model_state": load_state_dict_file(path / "model.safetensors")
        if (path / "model.safetensors").is_file()
        else None,
        "optimizer_state": torch.load(optimizer_file, weights_only=True) if optimizer_file.is_file() else None,
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "rank_state": json.loads(rank_file.read_text()) if rank_file.is_file() else None,
    }


def prune_checkpoints(root: Path, limit: int, keep_best: int = 2) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``, never the newest nor the ``keep_best`` lowest eval losses.

    Incomplete folders are left alone (a concurrent save may own them); returns the deleted paths.
    """
    complete = [(step, p) for step, p in checkpoint_dirs(root) if (p / MARKER).is_file()]
    if limit <= 0 or len(complete) <= limit:
        return []
    losses = {}
    for step, p in complete:
        try:
            loss = json.loads((p / "trainer_state.json").read_text()).get("eval_loss")
        except (OSError, ValueError):
            loss = None
        if loss is not None:
            losses[step] = loss
    protected = {complete[0][0]} | set(sorted(losses, key=losses.get)[:keep_best])
    deleted = []
    for step, p in reversed(complete):  # oldest first
        if len(complete) - len(deleted) <= limit:
            break
        if step not in protected:
            shutil.rmtree(p)
            deleted.append(p)
    return deleted


def remove_checkpoints(root: Path) -> None:
    """Delete every checkpoint under root (only on an explicit --init-model --overwrite-output-dir)."""
    for _, path in checkpoint_dirs(root):
        shutil.rmtree(path)
    for leftover in root.glob(".tmp-checkpoint-*") if root.is_dir() else []:
        shutil.rmtree(leftover)
