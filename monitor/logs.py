"""Run logs: one JSON object per line in ``trainer_logs.jsonl`` plus TensorBoard event files beside it, and the same
scalars, events and text samples in a Weights & Biases run with --wandb (monitor/wandb_run.py).

Layout inside an output directory::

    <output_dir>/runs/<YYYYmmdd-HHMMSS>/trainer_logs.jsonl
    <output_dir>/runs/<YYYYmmdd-HHMMSS>/events.out.tfevents.*

Every record has ``type`` (``train`` | ``eval`` | ``summary`` | ``event``), ``step`` and ``time`` (unix seconds),
then the caller's fields, e.g. ``tokens, loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_bytes`` (and
``docs/<source>``, ``tokens/<source>``) for ``train`` and ``tokens, loss, perplexity, bits_per_byte`` for ``eval``.
Non-finite floats are written as ``null`` so every line is strict JSON that ``jq`` and other languages read too.

A resumed run appends to the run directory it started in. Records logged after the checkpoint it resumes from
(the process may have died between saving and logging, or long after saving) are cut from the file first, and
TensorBoard is told to purge them, so each step appears once.
"""

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from console import say
from monitor.wandb_run import WandbRun

LOG_NAME = "trainer_logs.jsonl"
RECORD_TYPES = ("train", "eval", "summary", "event")


def new_run_dir(output_dir: Path) -> Path:
    """A fresh ``<output_dir>/runs/<timestamp>`` path (not created); names sort in creation order."""
    runs = Path(output_dir) / "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = runs / stamp, 1
    while path.exists():
        n += 1
        path = runs / f"{stamp}-{n}"
    return path


def find_run_dirs(output_dir: Path) -> list[Path]:
    """Run directories under ``<output_dir>/runs``, oldest first (the newest is the one a resume continues)."""
    runs = Path(output_dir) / "runs"
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if p.is_dir())


def _checkpointed_run_dir(output_dir: Path) -> Path | None:
    """The log folder the newest complete checkpoint names (the run a resume continues), when it has logs: a start
    that died or was put back before its first checkpoint leaves a newer, dead folder beside it."""
    from lifecycle.checkpoint import MARKER, checkpoint_dirs
    from lifecycle.checks import log_folder

    for _, checkpoint in checkpoint_dirs(output_dir / "checkpoints"):
        if not (checkpoint / MARKER).is_file():
            continue
        try:
            run_dir = json.loads((checkpoint / "trainer_state.json").read_text()).get("run_dir")
        except (OSError, ValueError, AttributeError):
            return None
        folder = log_folder(output_dir, run_dir) if isinstance(run_dir, str) else None
        return folder if folder is not None and (folder / LOG_NAME).is_file() else None
    return None


def resolve_log_file(path: Path | str) -> Path:
    """The jsonl file for a jsonl path, a run directory, or an output directory (the log of the run its newest
    checkpoint belongs to, else its newest run with logs)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / LOG_NAME).is_file():
        return path / LOG_NAME
    if path.is_dir():
        continued = _checkpointed_run_dir(path)
        if continued is not None:
            return continued / LOG_NAME
        with_logs = [run / LOG_NAME for run in find_run_dirs(path) if (run / LOG_NAME).is_file()]
        if with_logs:
            return with_logs[-1]
        raise ValueError(f"no {LOG_NAME} found in {path} or {path}/runs/*; pass a run directory or a jsonl file.")
    raise ValueError(f"{path} does not exist; pass an output directory, a run directory or a {LOG_NAME} file.")


def _parse_lines(lines: list[str], source: Path) -> list[dict]:
    """The records of a log's lines. A line that is JSON but no record of ours (not an object, or a step that is not
    an integer, a type that is not a string) is skipped with one warning; numeric fields of another type are left to
    the readers, which take numbers only."""
    records, skipped = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # NOTE: a process killed mid-write leaves a partial last line; anything else is real corruption.
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{source} line {i + 1} is not valid JSON; fix or delete that line.") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("type"), str) or not _is_int(step):
            skipped += 1
            continue
        records.append(record)
    if skipped and not records:  # no log of a run at all: one error, not a warning and then an error
        raise ValueError(f"{source} holds no records of a run ({skipped} line(s) of other JSON); pass a {LOG_NAME}")
    if skipped:
        print(f"warning: skipped {skipped} line(s) of {source} that are not records of a run", file=sys.stderr)
    return records


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_logs(path: Path | str) -> list[dict]:
    """All records of one run, in order; ``path`` as for ``resolve_log_file``."""
    log_file = resolve_log_file(path)
    try:
        text = log_file.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{log_file} is not a text log (not UTF-8); pass a {LOG_NAME}") from None
    return _parse_lines(text.splitlines(), log_file)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors/numpy scalars become numbers, non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class RunLogger:
    """Writes one run's JSON-lines log and TensorBoard scalars; every method is a no-op when ``enabled`` is False.

    Args:
        run_dir: the run directory (created if needed); see ``new_run_dir`` / ``find_run_dirs``.
        enabled: False on every rank but the main one.
        tensorboard: also write TensorBoard event files into ``run_dir``.
        resume_step: the step of the checkpoint being resumed: records with a larger step are dropped from the
            existing log before appending, and TensorBoard purges its events from ``resume_step + 1`` on.
        wandb: a started W&B run (monitor/wandb_run.py) that gets the same scalars, events and text samples as
            TensorBoard; finished by ``close``.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
        wandb: WandbRun | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOG_NAME
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = wandb if enabled else None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when it is used

            purge_step = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    def _truncate_after(self, step: int) -> None:
        kept, bad = [], []
        lines = self.path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:  # NOTE: a process killed mid-write leaves a partial last line: dropped
                record = None if i == len(lines) - 1 else line
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                if record.get("step", 0) <= step:
                    kept.append(record)
            elif record is not None:
                bad.append(line)
        if bad:  # a damaged line must not block a resume: set aside beside the log, and said once
            quarantine = self.path.with_name(LOG_NAME + ".bad-lines")
            with open(quarantine, "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in bad)
            say(f"warning: {len(bad)} unreadable line(s) of {self.path} moved to {quarantine.name}", err=True)
        tmp = self.path.with_name(f".{LOG_NAME}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a crash leaves either the old or the new file, never half of one

    def log(self, record: dict[str, Any]) -> dict | None:
        """Append one record (it needs ``type`` and ``step``; ``time`` defaults to now) and mirror its numeric
        fields to TensorBoard as ``<type>/<field>``; returns the record as written, or None when disabled."""
        if record.get("type") not in RECORD_TYPES:
            raise ValueError(f"record type must be one of {', '.join(RECORD_TYPES)}, got {record.get('type')!r}.")
        if "step" not in record:
            raise ValueError(f"a {record['type']} record needs a step.")
        if not self.enabled:
            return None
        head = {"type": record["type"], "step": int(record["step"]), "time": record.get("time", time.time())}
        record = _jsonable({**head, **{k: v for k, v in record.items() if k not in head}})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step, kind = record["step"], record["type"]
        details = {k: v for k, v in record.items() if k not in ("type", "step", "time")}
        numeric = {k: v for k, v in details.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        scalars = {} if kind == "event" else {f"{kind}/{key}": value for key, value in numeric.items()}
        if self._tb is not None:
            if kind == "event":
                self._tb.add_text("events", f"`{json.dumps(details)}`", global_step=step)
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            if kind == "event":
                self._wandb.event(step, record["event"], {k: v for k, v in details.items() if k != "event"})
            self._wandb.scalars(step, scalars)
        return record

    def train(self, step: int, **fields: Any) -> dict | None:
        """A training record: tokens, loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_bytes."""
        return self.log({"type": "train", "step": step, **fields})

    def eval(self, step: int, **fields: Any) -> dict | None:
        """An eval record: tokens, loss; perplexity is added from the loss."""
        if fields.get("loss") is not None and "perplexity" not in fields:
            loss = float(fields["loss"])
            fields["perplexity"] = math.exp(loss) if loss < 700 else math.inf
        return self.log({"type": "eval", "step": step, **fields})

    def summary(self, step: int, **fields: Any) -> dict | None:
        """The closing record of a run (final losses, wall time, ...)."""
        return self.log({"type": "summary", "step": step, **fields})

    def event(self, step: int, event: str, **fields: Any) -> dict | None:
        """Something that happened: ``start`` (args, versions), ``resume``, ``stage``, ``divergence``, ..."""
        return self.log({"type": "event", "step": step, "event": event, **fields})

    def text(self, tag: str, text: str, step: int) -> None:
        """A text sample (e.g. a generation) in TensorBoard's Text tab and W&B; not written to the jsonl log."""
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.text(tag, text, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
