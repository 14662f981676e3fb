"""Replacing a run (`--init-model --overwrite-output-dir`) without ever losing the old one first.

Invariants, at every instant (a kill included):
- the old run's `checkpoints/`, `final/` (and `tokenizer/`, when the new run brings another) are either in place or
  in `<output_dir>/.replaced/`; they move there only after every process of the new start validated its inputs;
- they are deleted only once the new run has a complete checkpoint or a finished export of its own (`done()`);
  `.replaced/replaced-by.json` names the start that set them aside, and that start's checkpoints carry the same
  `start_id`, which is how a later start tells them from the old run's;
- a new run that ends before that puts them back; one killed before that leaves `.replaced/`, which the next start
  settles (`settle_replaced`): it finishes a deletion the new run had earned, and otherwise refuses to start,
  saying how to keep either run.
`Replacement` is the whole transaction as one context manager; the functions below are its moves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from console import say
from lifecycle.checkpoint import fsync_dir, latest_checkpoint, write_json

REPLACED = ".replaced"
REPLACED_BY = "replaced-by.json"


def set_aside(output_dir: Path, names: list[str], start_id: str) -> bool:
    """Move output_dir/<name>, for each name that exists, into output_dir/.replaced/; False when none exists.

    "checkpoints" goes first: a kill after it leaves nothing to resume from but .replaced/, which the next start
    reports (settle_replaced).
    """
    present = sorted((n for n in names if (output_dir / n).exists()), key=lambda n: n != "checkpoints")
    if not present:
        return False
    aside = output_dir / REPLACED
    aside.mkdir(exist_ok=True)
    write_json(aside / REPLACED_BY, {"start_id": start_id})  # before anything moves in
    for name in present:
        os.rename(output_dir / name, aside / name)
    fsync_dir(aside)
    fsync_dir(output_dir)
    return True


def _record(aside: Path) -> dict:
    try:
        record = json.loads((aside / REPLACED_BY).read_text())
        return record if isinstance(record, dict) and isinstance(record.get("start_id"), str) else {}
    except (OSError, ValueError):  # absent, or cut short by a kill while it was written
        return {}


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def mark_export(output_dir: Path, start_id: str, weights: Path) -> None:
    """Before the replacing run publishes its export (--save-strategy no): record which file will prove it done."""
    aside = output_dir / REPLACED
    if aside.is_dir():
        tmp = aside / (REPLACED_BY + ".tmp")
        write_json(tmp, {"start_id": start_id, "export": _identity(weights)})
        os.replace(tmp, aside / REPLACED_BY)


def _replacement_done(output_dir: Path, record: dict) -> bool:
    """True when the start that set .replaced/ aside has a complete checkpoint in checkpoints/, or its finished export
    is final/ (the same file, renamed into place)."""
    start_id = record.get("start_id")
    if start_id is None:
        return False
    with contextlib.suppress(OSError):
        if record.get("export") == _identity(output_dir / "final" / "model.safetensors"):
            return True
    latest = latest_checkpoint(output_dir / "checkpoints", warn=lambda _: None)
    if latest is None:
        return False
    try:
        return json.loads((latest / "trainer_state.json").read_text()).get("start_id") == start_id
    except (OSError, ValueError):
        return False


def put_back(output_dir: Path, start_id: str) -> bool:
    """Undo set_aside (the replacing run ended before its first checkpoint); False when nothing was put back.

    When the replacing run did complete a checkpoint (it failed after writing it, before dropping .replaced/), that
    run stands: the old one is deleted instead, as settle_replaced would at the next start.
    """
    aside = output_dir / REPLACED
    if not aside.is_dir():
        return False
    if _replacement_done(output_dir, {"start_id": start_id} | _record(aside)):
        drop_replaced(output_dir)
        return False
    # "checkpoints" comes back last: once it is back, .replaced/ holds at most replaced-by.json (settle_replaced)
    for item in sorted(aside.iterdir(), key=lambda p: p.name == "checkpoints"):
        if item.name in (REPLACED_BY, REPLACED_BY + ".tmp"):
            continue
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)  # what the replacing run wrote: no complete checkpoint
        os.rename(item, target)
    fsync_dir(output_dir)
    shutil.rmtree(aside)
    return True


def settle_replaced(output_dir: Path) -> str | None:
    """At start, on the main process holding the run's lock, before anything in the output dir is read: what a
    replacing start killed midway left behind.

    After the replacing run's first complete checkpoint, the old run's deletion was cut short: finish it. Before it,
    return why this start must not go on (a new start would delete the old run at its own first checkpoint).
    """
    aside, doomed = output_dir / REPLACED, output_dir / (REPLACED + ".dropping")
    for path in (aside, doomed):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            return f"{path} is not a folder this project made, but runs keep one there; move it out of {output_dir}"
    if doomed.exists():  # a deletion cut short
        shutil.rmtree(doomed)
    if not aside.exists():
        return None
    record = _record(aside)
    if not [p for p in aside.iterdir() if p.name not in (REPLACED_BY, REPLACED_BY + ".tmp")]:  # nothing moved yet,
        shutil.rmtree(aside)  # or everything moved back
        return None
    if not record:
        return (
            f"{aside} holds files that no start of this project set aside there; move them out of {output_dir} "
            "and start again"
        )
    if _replacement_done(output_dir, record):
        drop_replaced(output_dir)
        return None
    return (
        f"{aside} holds the run that an --init-model --overwrite-output-dir start replaced, but that start was killed "
        f"before its first checkpoint; to keep the old run, move everything in it but {REPLACED_BY} back into "
        f"{output_dir} in place of what is there (checkpoints/ last); to keep neither, delete {aside}"
    )


def drop_replaced(output_dir: Path) -> None:
    """Delete what set_aside kept (the replacing run has a complete checkpoint or export of its own).

    Renamed out of the way first: a kill during the deletion cannot leave a half-deleted .replaced/ behind.
    """
    aside, doomed = output_dir / REPLACED, output_dir / (REPLACED + ".dropping")
    if not aside.is_dir():
        return
    if doomed.is_symlink() or doomed.is_file():  # not ours (the next start names it): delete in place instead
        shutil.rmtree(aside, ignore_errors=True)
        return
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(aside, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class Replacement:
    """The old run set aside for the life of the block (`enabled`: this start replaces a run, on the main process).

    Call `done()` once the new run has a complete checkpoint (or, with `exporting()`, a finished export): the old
    run is deleted. Leaving the block before that puts the old run back.
    """

    def __init__(self, output_dir: Path, start_id: str, names: list[str], enabled: bool) -> None:
        self.output_dir, self.start_id, self.names, self.enabled = output_dir, start_id, names, enabled
        self.pending = False  # the old run is aside and not yet deleted

    def __enter__(self) -> Replacement:
        if self.enabled:
            self.pending = True
            try:
                self.pending = set_aside(self.output_dir, self.names, self.start_id)
            except BaseException:  # a second signal or an error inside set_aside: put back what had moved
                self.__exit__()
                raise
        return self

    def exporting(self, weights: Path) -> None:
        """Before an export without a checkpoint is published: a kill between publishing and `done()` leaves a
        record the next start reads as "the new run finished"."""
        if self.pending:
            mark_export(self.output_dir, self.start_id, weights)

    def done(self) -> None:
        if self.pending:
            drop_replaced(self.output_dir)
            self.pending = False

    def __exit__(self, *exc) -> None:
        if not self.pending:
            return
        self.pending = False
        try:
            if put_back(self.output_dir, self.start_id):
                say(f"the run this one replaced is back in {self.output_dir} (this ended before its first checkpoint)")
        except OSError as e:  # e.g. another rank still writing into checkpoints/: the next start names .replaced/
            say(f"warning: the replaced run stays in {self.output_dir / REPLACED} ({e})", err=True)
