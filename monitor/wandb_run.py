"""Weights & Biases: a run's logs mirrored to a W&B run with `--wandb PROJECT[/RUN]`, from the main process only.

`RunLogger` hands this every record it writes: the numeric fields of `train`, `eval` and `summary` records become
the scalars `<type>/<field>` (the TensorBoard tags), each event a one-row table `events` (step, event, details) and
each text sample a one-row table under its tag (`sample`: step, text); the run info (arguments, plan, model, data,
devices, versions, git commit) is the W&B config. `wandb` is imported only with --wandb (it takes about a second).

Steps. A resume keeps its log folder, which holds `wandb_run.json`: the W&B run id, continued with resume="allow",
and the next W&B step. W&B drops any record whose step is below its last one, and a resumed run repeats steps: the
killed process may have logged past its checkpoint, and a rollback returns to an earlier one. So the training step
is not the W&B step; it is logged in every row as the metric `step`, which `define_metric` makes the x-axis of
every chart, and the W&B step is a counter of our own that only grows. The counter is kept in that file and each
value is saved before its row is logged, so a kill leaves a gap, never a reused step. Nothing is dropped, online or
offline (`wandb sync` uploads a resumed run's offline folders in order) and the charts plot each value at its
training step. NOTE: rows a killed run logged after its checkpoint stay in W&B (a client cannot delete history,
where TensorBoard purges them), so a resumed chart can show those steps twice: once from each attempt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from console import UsageError, is_main_process, say

ID_FILE = "wandb_run.json"
INSTALL = "pip install wandb==0.31.0 (the version requirements.txt pins)"


def project_run(text: str) -> str:
    """The argparse `type` of --wandb: PROJECT or PROJECT/RUN, refused in one line when W&B could not log it.

    Checked when parsed (also under --dry-run): the name as W&B accepts it, the package, and in online mode, on the
    main process, W&B credentials: without them `wandb.init` would ask for an API key on a terminal and wait.
    """
    project, slash, name = text.partition("/")
    if not project.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names no project; expected PROJECT or PROJECT/RUN")
    if "/" in name:
        raise argparse.ArgumentTypeError(
            f"{text!r} has more than one '/'; expected PROJECT or PROJECT/RUN (set the entity with WANDB_ENTITY)"
        )
    if slash and not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has an empty run name after '/'; drop the '/' or name the run")
    bad = sorted(set(project) & set("\\#?%:"))
    if bad or len(project) > 128:
        raise argparse.ArgumentTypeError(
            f"{project!r} is not a W&B project name: at most 128 characters, none of \\ # ? % :"
        )
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a module set to None (blocked) or a broken package
        found = False
    if not found:
        raise argparse.ArgumentTypeError(f"the wandb package is not installed; {INSTALL}")
    if is_main_process():
        _check_credentials()
    return text


def _check_credentials() -> None:
    """Online mode needs an API key (or an identity token) that wandb finds by itself: WANDB_API_KEY, .netrc from
    `wandb login`, or its settings. Offline and disabled modes need none."""
    import wandb  # slow import: only with --wandb
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    # NOTE: wandb's own lookup, without its prompt and without starting its service; these two are internal to
    # wandb (0.31.0, pinned) and tests/test_wandb.py runs them.
    settings = wandb_setup.singleton().settings
    if settings.mode in ("offline", "dryrun", "disabled"):
        return
    try:
        found = wbauth.authenticate_session(
            host=settings.base_url, source="--wandb", prompt=False, update_session=False
        )
    except wandb.errors.Error as e:  # a key of the wrong form, a missing identity token file
        raise argparse.ArgumentTypeError(f"W&B credentials: {e}") from None
    if found is None:
        raise argparse.ArgumentTypeError(
            f"no W&B API key for {settings.base_url}: set WANDB_API_KEY or run `wandb login`, "
            "or set WANDB_MODE=offline to log locally (`wandb sync` uploads later)"
        )


class WandbRun:
    """The W&B run mirroring one log folder: started (or resumed) at construction, on the main process only.

    Args:
        target: the --wandb value, PROJECT or PROJECT/RUN (checked by `project_run`).
        run_dir: the run's log folder; it keeps `wandb_run.json` and, unless WANDB_DIR is set, W&B's own files.
        config: the run info (monitor/runinfo.py), the W&B config.
    """

    def __init__(self, target: str, run_dir: Path, config: dict) -> None:
        import wandb  # slow import: only with --wandb

        self._wandb = wandb
        self._file = Path(run_dir) / ID_FILE
        saved = self._read_saved()
        project, _, name = target.partition("/")
        self._file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                name=name or None,
                id=saved.get("id"),
                resume="allow",
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            )
        except wandb.errors.Error as e:  # no network, a refused key: before the first step, nothing trained
            raise UsageError(
                f"--wandb {target}: W&B could not start the run ({e}); WANDB_MODE=offline logs locally"
            ) from None
        self.run.config.update(config, allow_val_change=True)  # a resume may change arguments (--max-steps, ...)
        self.run.define_metric("step", hidden=True)
        for kind in ("train", "eval", "summary"):
            self.run.define_metric(f"{kind}/*", step_metric="step")
        self._next_step = max(int(saved.get("next_step", 0)), self.run.step)
        self._save()

    def _read_saved(self) -> dict:
        if not self._file.is_file():
            return {}
        try:
            saved = json.loads(self._file.read_text())
            if isinstance(saved, dict) and isinstance(saved.get("id"), str) and isinstance(saved.get("next_step"), int):
                return saved
        except (OSError, ValueError):
            pass
        say(f"warning: {self._file} is unreadable; logging to a new W&B run", err=True)
        return {}

    def _save(self) -> None:
        tmp = self._file.with_name(f".{ID_FILE}.tmp")
        tmp.write_text(json.dumps({"id": self.run.id, "next_step": self._next_step}))
        os.replace(tmp, self._file)  # a kill leaves the old file or the new one, never half of one

    def _log(self, step: int, values: dict[str, Any]) -> None:
        wandb_step = self._next_step
        self._next_step += 1
        self._save()  # before the row: a kill after it leaves a gap in W&B's steps, never a reused one
        self.run.log({"step": step, **values}, step=wandb_step)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Numeric fields of one record, keyed `<type>/<field>`."""
        if scalars:
            self._log(step, scalars)

    def event(self, step: int, event: str, details: dict) -> None:
        table = self._wandb.Table(columns=["step", "event", "details"], data=[[step, event, json.dumps(details)]])
        self._log(step, {"events": table})

    def text(self, tag: str, text: str, step: int) -> None:
        self._log(step, {tag: self._wandb.Table(columns=["step", "text"], data=[[step, text]])})

    def finish(self) -> None:
        self.run.finish()
