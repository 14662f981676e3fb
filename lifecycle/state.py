"""The whole state of a run that a checkpoint holds, and its three moves: resume, save and roll back.

A checkpoint holds the weights and optimizer state (by parameter name, from the layout), the data position, every
rank's RNG, `TrainState`, the divergence detector's averages and a description of the run. The LR schedule is a
function of the step and `TrainState.lr_factor`, so restoring those restores it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from console import say
from lifecycle.checkpoint import Checkpointer, DamagedCheckpoint, capture_rng, restore_rng
from lifecycle.divergence import DivergenceDetector


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer and data position."""

    step: int = 0
    tokens: int = 0
    lr_factor: float = 1.0  # lowered by each rollback
    rollbacks: int = 0
    run_dir: str | None = None  # the log folder, relative to the output dir


class RunState:
    """One run's state across checkpoints, the same for every layout (`lay`: a parallel.Layout).

    `describe` is what every checkpoint records about the run besides its progress (model, plan, args, run info,
    the start id that tells this start's checkpoints from a replaced run's: lifecycle/replace.py).
    """

    def __init__(self, lay, checkpoints: Checkpointer, scheduler, detector: DivergenceDetector, describe: dict):
        self.lay, self.checkpoints, self.scheduler, self.detector = lay, checkpoints, scheduler, detector
        self.describe = describe
        self.train = TrainState()
        self.batches = None  # the training batches (lay.start_data), whose position a checkpoint records
        self.data_state: dict | None = None  # the data position to start from (a resume)
        # The step a rollback went back to: diverging again before anything new was saved means that checkpoint
        # itself is bad (e.g. finite weights so large that every gradient overflows), so the next goes further back.
        self.rollback_floor: int | None = None

    def _load(self, path: Path, data_too: bool) -> None:
        saved = self.checkpoints.load(path, self.lay.place)
        self.lay.load(saved["model_state"], saved["optimizer_state"])
        trainer = saved["trainer_state"]
        for f in fields(TrainState):
            setattr(self.train, f.name, trainer.get(f.name, getattr(self.train, f.name)))
        self.detector.load_state_dict(trainer["divergence"])
        if data_too:
            self.data_state = trainer["data_state"]  # the layout's start_data resumes its stream there
        if saved["rank_state"] is not None and trainer["world_size"] == self.lay.process.world:
            restore_rng(saved["rank_state"]["rng"])

    def resume(self, path: Path, data_too: bool) -> None:
        self._load(path, data_too)
        self.scheduler.restore(self.train.step, self.train.lr_factor)

    def resume_newest(self, path: Path, data_too: bool, warn) -> Path:
        """Resume from `path`, or, when it verifies but cannot be read (DamagedCheckpoint), from the newest older
        checkpoint that can, each skipped one named by `warn`; returns the checkpoint resumed. Nothing of a skipped
        one is applied (every file is read before the state is touched)."""
        while True:
            try:
                self.resume(path, data_too)
                return path
            except DamagedCheckpoint as e:
                older = self.checkpoints.latest(before=int(path.name.rsplit("-", 1)[1]))
                if older is None:
                    raise
                warn(f"warning: skipping {e}; resuming {older.name}")
                path = older

    def advance(self, tokens: int) -> int:
        """Count one optimizer update (after the layout's step); returns its step number."""
        self.scheduler.step()
        self.train.step, self.train.tokens = self.train.step + 1, self.train.tokens + tokens
        return self.train.step

    def save(self, eval_loss: float) -> Path:
        """Write checkpoint-<step> (every rank its part) and prune old ones; returns its path."""
        is_main = self.lay.process.is_main
        trainer = {
            **asdict(self.train),
            "eval_loss": eval_loss,
            "divergence": self.detector.state_dict(),
            "world_size": self.lay.process.world,
            **self.describe,
            "data_state": self.batches.state_dict() if is_main and self.batches is not None else None,
        }
        model_part, optimizer_part = self.lay.checkpoint_parts()
        path, pruned = self.checkpoints.save(
            self.train.step,
            model_part=model_part,
            optimizer_part=optimizer_part,
            trainer_state=trainer if is_main else None,
            rank_state={"rng": capture_rng()},
        )
        self.rollback_floor = None
        say(f"saved {path}" + (f" (removed {len(pruned)} older)" if pruned else ""))
        return path

    def rollback(self, lr_factor: float, max_rollbacks: int) -> Path | None:
        """Go back to the newest checkpoint below the floor with the LR x `lr_factor`, keeping the data position (the
        offending batches are skipped); None when there is none or the rollbacks are used up."""
        target = self.checkpoints.latest(before=self.rollback_floor)
        if target is None or self.train.rollbacks >= max_rollbacks:
            return None
        rollbacks, factor = self.train.rollbacks + 1, self.train.lr_factor * lr_factor
        self._load(target, data_too=False)
        self.rollback_floor = self.train.step
        self.checkpoints.discard_after(self.train.step)  # a resume must never pick up the abandoned history
        self.train.rollbacks, self.train.lr_factor = rollbacks, factor
        self.scheduler.restore(self.train.step, factor)
        return target
