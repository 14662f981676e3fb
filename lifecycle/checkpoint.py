"""Crash-safe checkpoints that do not depend on the layout: atomic writes, checksums, retention, per-rank RNG state.

Layout of one checkpoint (``<output_dir>/checkpoints/checkpoint-<step>/``):

    model-<k>.safetensors   weights held by rank k, by Transformer parameter name (tied tensors once)
    optimizer-<k>.pt        rank k's optimizer state keyed by parameter name, loaded weights_only
    trainer_state.json      progress, schedule step, data state, args...            written by the main rank
    rank-<k>.json           RNG states of rank k                                     written by every rank
    COMPLETE                JSON: file -> sha256, written last                       written by the main rank

Data parallel runs write one part (rank 0 holds everything); a K-stage pipeline writes K parts, one per stage.
Loading merges every part by name, so any layout reads what any other wrote and takes the names it holds: one
process, N-process DDP and pipelines with any number of stages resume from each other's checkpoints.

A sharded layout (FSDP, whose parts hold DTensors) writes instead, through torch.distributed.checkpoint with its
safetensors storage (every rank its own shards, their offsets in each file's JSON header):

    model/shard-<r>-model-00001-of-00001.safetensors       rank r's shards of the weights, by parameter name
    optimizer/shard-<r>-model-00001-of-00001.safetensors   its shards of the optimizer state, "<name>/<state key>"
    optimizer/scalars.json                                 step counters and other plain numbers (the same on all ranks)

`load_checkpoint` reads both forms for every layout: whole tensors by name (merged parts, or the shards joined), or,
given a `place` function, only the slices this rank holds, straight into its DTensors, whatever the number of
processes that wrote them.

Everything is first written to ``.tmp-checkpoint-<step>/`` and renamed into place only when complete, so a kill at
any moment leaves either no new checkpoint or a complete one. Loading verifies the checksums and skips a damaged
checkpoint with a warning. Nothing is ever unpickled beyond plain tensors (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.tensor import DTensor

from models.config import ModelConfig
from models.hf import current_umask, save_weights
from models.memory import parameter_shapes

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
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


def verify(path: Path, contents: Callable[[Path, dict], str | None] | None = None) -> str | None:
    """None when the checkpoint is complete and every checksum matches (and `contents(path, files)`, when given,
    finds nothing wrong: `run_contents` for train.py's checkpoints), else what is wrong."""
    if path.is_symlink():  # never followed: a checkpoint is a folder a run wrote, not a link to one
        return "a link, not a checkpoint folder"
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError):
        return "unreadable completion marker"
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "unreadable completion marker"
    if not ("trainer_state.json" in files and any(k.startswith(("model-", "model/")) for k in files)
            and any(k.startswith(("optimizer-", "optimizer/")) for k in files)):  # fmt: skip
        return "its completion marker does not list the weights, optimizer and trainer state"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} fails its checksum"
    return contents(path, files) if contents is not None else None


TRAINER_KEYS = {
    "step": int,
    "world_size": int,
    "model_config": dict,
    "divergence": dict,
    "data_state": (dict, type(None)),
}


def run_contents(path: Path, files: dict[str, str]) -> str | None:
    """What a checkpoint of train.py whose files all match their checksums can still get wrong (written by another
    tool, or edited and re-summed): the trainer state's fields, the ranks' states, every weight of the model."""
    try:
        trainer = json.loads((path / "trainer_state.json").read_text())
        ranks = [json.loads((path / name).read_text()) for name in files if re.fullmatch(r"rank-\d+\.json", name)]
    except (ValueError, OSError) as e:
        return f"a state file is not JSON ({type(e).__name__})"
    if not isinstance(trainer, dict):
        return "trainer_state.json is not an object"
    for key, kinds in TRAINER_KEYS.items():
        if key not in trainer or not isinstance(trainer[key], kinds):
            return f"trainer_state.json has no valid {key!r}"
    if isinstance(trainer["step"], bool) or trainer["step"] != int(path.name.rsplit("-", 1)[1]):
        return f"its trainer state is of step {trainer['step']}, not of {path.name}"
    if not all(isinstance(r, dict) and isinstance(r.get("rng"), dict) for r in ranks):
        return "a rank's state (rank-*.json) has no random-generator state"
    if (path / "model").is_dir():  # a sharded checkpoint: its own index is checked when it is read
        return None
    try:
        expected = set(parameter_shapes(ModelConfig.from_dict(trainer["model_config"])))
        held = set()
        for name in files:
            if re.fullmatch(r"model-\d+\.safetensors", name):
                with safe_open(path / name, "pt") as f:
                    held |= set(f.keys())
    except Exception as e:  # a model config or a weight file no loader could read
        return f"its model cannot be read ({type(e).__name__}: {str(e)[:80]})"
    if missing := sorted(expected - held):
        return f"its weights lack {len(missing)} tensor(s) ({missing[0]}, ...)"
    return None


def latest_checkpoint(
    root: Path, warn: Callable[[str], None] = print, before: int | None = None, contents=None
) -> Path | None:
    """The newest complete, verified checkpoint (older than step `before` if given; `contents` as for `verify`);
    damaged ones are skipped."""
    for step, path in checkpoint_dirs(root):
        if before is not None and step >= before:
            continue
        problem = verify(path, contents)
        if problem is None:
            return path
        warn(f"warning: skipping damaged checkpoint {path}: {problem}")
    return None


class DamagedCheckpoint(ValueError):
    """A checkpoint that verified but cannot be read (an optimizer pickle refused by the safe loader)."""


class DiskFull(OSError):
    """A checkpoint could not be written for lack of space; its staging folder is already removed."""


def clear_staging(root: Path) -> list[Path]:
    """Remove the staging folders of saves a crash or a full disk cut short (``.tmp-checkpoint-*``) and what a kill
    inside a rollback's discard left (``.abandoned-checkpoint-*``); a link of those names is unlinked, never
    followed. Returns what was removed. Rank 0, at the start of a run."""
    removed = []
    leftovers = [*Path(root).glob(".tmp-checkpoint-*"), *Path(root).glob(".abandoned-checkpoint-*")]
    for path in sorted(leftovers) if Path(root).is_dir() else []:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def _space_left(root: Path) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return -1


def save_checkpoint(
    root: Path,
    step: int,
    *,
    rank: int,
    barrier: Callable[[], None],
    model_part: dict[str, torch.Tensor] | None,
    optimizer_part: dict | None,
    trainer_state: dict | None,
    rank_state: dict,
) -> Path:
    """Write a checkpoint atomically. Every rank calls this with its part (None: it holds nothing to write).

    Rank 0 passes ``trainer_state``. If ``checkpoint-<step>`` already exists and verifies, nothing is rewritten: the
    state at a given step is the same after an exact resume (a rollback first discards the newer checkpoints of the
    history it abandons, see `Checkpointer.discard_after`). One that fails verification is replaced.
    """
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    exists = final.is_dir() and verify(final) is None
    if rank == 0 and not exists:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a crash in the middle of a save
        if final.exists():
            shutil.rmtree(final)  # damaged or incomplete under the final name: write it again
        tmp.mkdir(parents=True)
    barrier()
    if exists:
        return final
    try:
        _write_parts(tmp, rank, model_part, optimizer_part, trainer_state, rank_state)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _space_left(root) < (1 << 20)
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint holding the space
        if full:
            raise DiskFull(errno.ENOSPC, f"no space left on device in {root} (checkpoint-{step} not written)") from e
        raise
    barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        write_json(tmp / MARKER, {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}})
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    barrier()
    return final


def _write_parts(tmp: Path, rank: int, model_part, optimizer_part, trainer_state, rank_state) -> None:
    """This rank's files of a checkpoint, into its staging folder."""
    if is_sharded(model_part):  # every rank takes part in these collective writes
        _save_sharded(model_part, tmp / "model")
        tensors, scalars = _flatten_optimizer(optimizer_part)
        _save_sharded(tensors, tmp / "optimizer")
        if rank == 0:
            write_json(tmp / "optimizer" / "scalars.json", scalars)
    else:
        if model_part is not None:
            save_state_dict(model_part, tmp / f"model-{rank}.safetensors")
        if optimizer_part is not None:
            torch.save(optimizer_part, tmp / f"optimizer-{rank}.pt")
    if rank == 0:
        write_json(tmp / "trainer_state.json", trainer_state)
    write_json(tmp / f"rank-{rank}.json", rank_state)


def is_sharded(part: dict | None) -> bool:
    """True for a part holding DTensors (FSDP's shards), which only torch.distributed.checkpoint writes."""
    return part is not None and any(isinstance(t, DTensor) for t in part.values())


def _save_sharded(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Collective: each rank writes its shards (plain tensors, replicated, by one rank) as safetensors."""
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    mode = 0o666 & ~current_umask()
    for file in folder.glob("*.safetensors"):  # the weights follow the umask like every other file of the run
        with contextlib.suppress(FileNotFoundError):  # another rank's file, renamed meanwhile
            os.chmod(file, mode)


def _flatten_optimizer(part: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer_state_by_name's form -> ({"<name>/<key>" or "extra/<key>": tensor}, {same keys: plain numbers})."""
    tensors, scalars = {}, {}
    entries = [(f"{name}/{key}", v) for name, per_param in part["state"].items() for key, v in per_param.items()]
    for key, value in entries + [(f"extra/{k}", v) for k, v in part.get("extra", {}).items()]:
        (tensors if torch.is_tensor(value) else scalars)[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[str, dict] = {}
    extra = {}
    for key, value in {**tensors, **scalars}.items():
        name, item = key.rsplit("/", 1)
        if name == "extra":
            extra[item] = value
        else:
            state.setdefault(name, {})[item] = value
    return {"state": state, "extra": extra}


def _read_sharded(folder: Path, place: Callable[[str, torch.Size, torch.dtype], torch.Tensor | None]) -> dict:
    """Every tensor saved under folder, read into ``place(key, global shape, dtype)`` (None: not wanted here).

    Reads only the slices the placed tensors cover (a DTensor's local shard, or all of a whole tensor); no process
    group is needed, so one process reads what N wrote.
    """
    reader = HuggingFaceStorageReader(str(folder))
    wanted = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        target = place(key, meta.size, meta.properties.dtype)
        if target is not None:
            wanted[key] = target
    with warnings.catch_warnings():  # a read without a process group is the intent here, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    return wanted


def _whole(key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def save_state_dict(state: dict[str, torch.Tensor], file: Path) -> None:
    """A state dict as safetensors, tensors that share storage (tied weights) stored once."""
    tensors, aliases = dedupe_state_dict(state)
    save_weights(tensors, file, metadata={"aliases": json.dumps(aliases)})


def load_state_dict_file(file: Path) -> dict[str, torch.Tensor]:
    """Inverse of save_state_dict: tied aliases restored (so ``load_state_dict(strict=True)`` works)."""
    with safe_open(str(file), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(file))
    for alias, source in aliases.items():
        state[alias] = state[source]
    return state


def _part(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def load_checkpoint(path: Path, rank: int, place: Callable | None = None) -> dict[str, Any]:
    """A verified checkpoint of any layout, by name; ``rank_state`` is None when this rank has no file.

    ``model_state``: every saved tensor by Transformer name. ``optimizer_state``: ``{"state": name -> per-parameter
    state, "extra": the non-per-parameter entries of this rank's part (or part 0's)}``.

    ``place(kind, name, key, shape, dtype)`` (kind "model" or "optimizer", key the optimizer state's key, else None)
    lets a sharded layout receive a sharded checkpoint as its own shards: it returns the (DTensor) tensor to read
    into, or None to skip. Without it, or for an unsharded checkpoint, tensors come whole.
    """
    if (path / "model").is_dir():
        return _load_sharded_checkpoint(path, rank, place)
    model_state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("model-*.safetensors"), key=_part):
        for name, tensor in load_state_dict_file(file).items():
            model_state.setdefault(name, tensor)  # a tied weight held by two stages is the same tensor
    optimizer_state: dict[str, Any] = {"state": {}, "extra": {}}
    for file in sorted(path.glob("optimizer-*.pt"), key=_part):
        try:
            part = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # never unpickled unsafely
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DamagedCheckpoint(f"{path} is damaged ({file.name} cannot be read safely: {why})") from None
        for name, value in part["state"].items():
            optimizer_state["state"].setdefault(name, value)
        if _part(file) in (0, rank):
            optimizer_state["extra"] = part.get("extra", {})
    return _with_states(path, rank, model_state, optimizer_state)


def _with_states(path: Path, rank: int, model_state: dict, optimizer_state: dict) -> dict[str, Any]:
    rank_file = path / f"rank-{rank}.json"
    return {
        "model_state": model_state,
        "optimizer_state": optimizer_state,
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "rank_state": json.loads(rank_file.read_text()) if rank_file.is_file() else None,
    }


def _load_sharded_checkpoint(path: Path, rank: int, place: Callable | None) -> dict[str, Any]:
    def model_target(key, shape, dtype):
        return place("model", key, None, shape, dtype) if place else _whole(key, shape, dtype)

    def optimizer_target(key, shape, dtype):
        name, item = key.rsplit("/", 1)
        if place is None or name == "extra":
            return _whole(key, shape, dtype)
        return place("optimizer", name, item, shape, dtype)

    model_state = _read_sharded(path / "model", model_target)
    tensors = _read_sharded(path / "optimizer", optimizer_target)
    scalars = json.loads((path / "optimizer" / "scalars.json").read_text())
    return _with_states(path, rank, model_state, _unflatten_optimizer(tensors, scalars))


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
        if loss is not None and math.isfinite(loss):  # a NaN eval loss ranks worst, never "best"
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


class Checkpointer:
    """save / restore / latest / prune of one run's checkpoints, the same for every layout.

    Every rank calls ``save`` with its own part (see the module docstring); rank 0 adds the trainer state and prunes.
    """

    def __init__(
        self, root: Path, *, rank: int, barrier: Callable[[], None], keep: int, warn=print, contents=run_contents
    ) -> None:
        self.root, self.rank, self.barrier, self.keep, self.warn = Path(root), rank, barrier, keep, warn
        self.contents = contents  # what verify checks beyond the files (`run_contents`: train.py's checkpoints)

    def latest(self, before: int | None = None) -> Path | None:
        warn = self.warn if self.rank == 0 else lambda _: None
        return latest_checkpoint(self.root, warn=warn, before=before, contents=self.contents)

    def save(self, step: int, *, model_part, optimizer_part, trainer_state, rank_state) -> tuple[Path, list[Path]]:
        """Write checkpoint-<step> (all ranks) and prune old ones (rank 0); returns (path, pruned paths)."""
        path = save_checkpoint(
            self.root,
            step,
            rank=self.rank,
            barrier=self.barrier,
            model_part=model_part,
            optimizer_part=optimizer_part,
            trainer_state=trainer_state,
            rank_state=rank_state,
        )
        pruned = prune_checkpoints(self.root, self.keep) if self.rank == 0 else []
        return path, pruned

    def load(self, path: Path, place: Callable | None = None) -> dict[str, Any]:
        return load_checkpoint(path, self.rank, place)

    def discard_after(self, step: int) -> list[Path]:
        """Remove the checkpoints newer than `step` (a rollback abandoned their history); each vanishes at once."""
        gone = []
        if self.rank == 0:
            for newer, path in checkpoint_dirs(self.root):
                if newer > step:
                    aside = path.with_name(f".abandoned-{path.name}")
                    if aside.is_dir() and not aside.is_symlink():  # left by a kill inside an earlier discard
                        shutil.rmtree(aside)
                    os.rename(path, aside)  # no longer a checkpoint from this instant on
                    shutil.rmtree(aside)
                    gone.append(path)
            fsync_dir(self.root)
        self.barrier()
        return gone
