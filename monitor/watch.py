"""What observes the training loop, as one object: the run's log folder, the JSON-lines/TensorBoard logs (and the
W&B run with --wandb), the run info, the progress display and the throughput meter."""

from __future__ import annotations

from pathlib import Path

from console import say
from monitor import runinfo
from monitor.logs import RunLogger, new_run_dir
from monitor.meter import Meter
from monitor.mfu import device_peak_flops
from monitor.progress import Progress
from monitor.wandb_run import WandbRun


class Watch:
    """Logs and displays a run. `run_dir` (relative to the output dir) is the log folder of the run resumed, or None
    for a new one: `self.run_dir` is the folder in use either way."""

    def __init__(self, run, run_dir: str | None, step: int, lay, info: dict, batches) -> None:
        enabled, plan = lay.process.is_main, run.plan
        resuming = run_dir is not None and not Path(run_dir).is_absolute()
        folder = run.output_dir / run_dir if resuming else new_run_dir(run.output_dir)
        self.run_dir = str(folder.relative_to(run.output_dir))
        # --wandb: the main process only; a resume continues the W&B run its log folder names
        mirror = WandbRun(run.args.wandb, folder, info) if enabled and run.args.wandb else None
        self.logger = RunLogger(folder, enabled=enabled, resume_step=step if resuming else None, wandb=mirror)
        if enabled:
            runinfo.write(folder, info)
            if run.args.verbose_info:
                runinfo.show(info)
        self.bar = Progress(plan.total_steps, plan.total_train_tokens, enabled=enabled, start_step=step)
        peak = device_peak_flops(lay.process.device, lay.process.dtype)
        how = "a measured CPU peak" if lay.process.device.type == "cpu" else "the datasheet peak"
        say(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({how})")
        self.meter = Meter(run.model_cfg, plan.tokens_per_step, lay.process.world, peak, lay.process.device)
        self.logging_steps, self.total_steps, self.dataset = plan.logging_steps, plan.total_steps, run.args.dataset
        self.stage = batches.current_stage if batches is not None else 0  # a curriculum's mix in use

    def after_step(self, step: int, tokens: int, loss, grad_norm, lr: float, batches) -> None:
        """Count the step; report a curriculum's next stage; log and display at the logging cadence (`loss` and
        `grad_norm` may be device tensors: they are read only then)."""
        self.meter.add_step(loss)
        if batches is not None and batches.current_stage != self.stage:  # a curriculum moved on to its next mix
            self.stage = batches.current_stage
            self.logger.event(step, "stage", stage=self.stage, dataset=self.dataset)
            say(f"step {step:,}: data stage {self.stage} of {self.dataset}")
        if step % self.logging_steps == 0 or step == self.total_steps:
            drawn = batches.source_counts() if batches is not None else {}  # documents and tokens per source
            per_source = {f"{kind}/{label}": n[kind] for label, n in drawn.items() for kind in ("docs", "tokens")}
            record = self.logger.train(
                step, tokens=tokens, lr=lr, grad_norm=float(grad_norm), **self.meter.record(), **per_source
            )
            self.bar.update(step, tokens, record or {})

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
