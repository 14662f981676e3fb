"""Pipeline geometry: how a global batch is cut into micro-batches and stages, and which engine runs a schedule."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from console import UsageError
from schedule.plan import check_int

# Schedule name -> (canonical name, stages per rank). The short forms are accepted too ("1F1B", "Interleaved1F1B"...).
PIPELINE_SCHEDULES = {
    "ScheduleGPipe": 1,
    "Schedule1F1B": 1,
    "ScheduleInterleaved1F1B": 2,
    "ScheduleLoopedBFS": 2,
    "ScheduleInterleavedZeroBubble": 2,
    "ScheduleZBVZeroBubble": 2,
}


def pipeline_schedule_name(name: str) -> str:
    """The spec's class name for `name` (``1F1B`` -> ``Schedule1F1B``); ValueError naming the choices."""
    full = name if name.startswith("Schedule") else f"Schedule{name}"
    if full not in PIPELINE_SCHEDULES:
        choices = ", ".join(PIPELINE_SCHEDULES)
        raise ValueError(f"--pipeline-schedule {name} is not a schedule; choose one of {choices} (or drop 'Schedule')")
    return full


@dataclass(frozen=True)
class PipelineGeometry:
    """How one global batch flows through the pipelines (the spec's formulas, per optimizer step):

    n_microbatches       = ranks * stages_per_rank * microbatch_scale          (per replica and accumulation step)
    per_stage_batch_size = batch_size // (stages_per_rank * microbatch_scale)   (rows per micro-batch)
    pipeline batch       = n_microbatches * per_stage_batch_size = ranks * batch_size

    `ranks` processes form one pipeline and `replicas = world_size / ranks` pipelines train side by side on their
    own rows (data parallel), so the global batch is world_size * batch_size (x accumulation) and the sqrt LR scale
    equals DDP's on the same number of processes.
    """

    schedule: str
    ranks: int  # processes in one pipeline
    replicas: int  # data-parallel copies of the pipeline
    stages: int  # ranks * stages_per_rank
    stages_per_rank: int
    microbatch_scale: int
    micro_batch_size: int  # rows per micro-batch
    micro_batches: int  # per replica and optimizer step, accumulation included
    global_batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pipeline_geometry(
    schedule: str,
    *,
    batch_size: int,
    world_size: int,
    microbatch_scale: int = 1,
    grad_accum: int = 1,
    pipeline_ranks: int | None = None,
) -> PipelineGeometry:
    """Resolve the pipeline's micro-batches; ValueError naming the numbers to change when they do not divide.

    `pipeline_ranks` (``--pipeline-stages``) is the number of processes per pipeline; None: the whole world.
    """
    check_int(microbatch_scale, "--microbatch-scale", 1, "pass a positive multiplier of the micro-batches, e.g. 1")
    name = pipeline_schedule_name(schedule)
    ranks = world_size if pipeline_ranks is None else pipeline_ranks
    check_int(ranks, "--pipeline-stages", 1, "pass the processes per pipeline, e.g. --pipeline-stages 2")
    if world_size % ranks:
        raise ValueError(
            f"--pipeline-stages {ranks} does not divide the {world_size} processes into whole pipelines; use a "
            f"divisor of {world_size}"
        )
    per_rank = PIPELINE_SCHEDULES[name]
    split = per_rank * microbatch_scale
    if batch_size % split:
        raise ValueError(
            f"--batch-size {batch_size} is not divisible by stages_per_rank x microbatch_scale = {per_rank} x "
            f"{microbatch_scale} = {split} ({name}); use a --batch-size that is a multiple of {split} or change "
            "--microbatch-scale"
        )
    return PipelineGeometry(
        schedule=name,
        ranks=ranks,
        replicas=world_size // ranks,
        stages=ranks * per_rank,
        stages_per_rank=per_rank,
        microbatch_scale=microbatch_scale,
        micro_batch_size=batch_size // split,
        micro_batches=ranks * split * grad_accum,
        global_batch_size=world_size * batch_size * grad_accum,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_pipeline(g: PipelineGeometry, tokens_per_step: int) -> str:
    copies = f" x {g.replicas} data-parallel replicas" if g.replicas > 1 else ""
    on = f"{_count(g.stages, 'stage')} on {_count(g.ranks, 'rank')}"
    rows = [
        ("pipeline", f"{g.schedule}: {on} ({g.stages_per_rank} per rank){copies}"),
        ("micro-batches", f"{g.micro_batches} of {g.micro_batch_size} sequences per step and replica"),
        ("pipeline batch", f"{g.global_batch_size} sequences = {tokens_per_step:,} tokens per step"),
    ]
    return "\n".join(f"{name:<15}  {value}" for name, value in rows)


# Which engine runs a pipeline schedule: DeepSpeed's PipelineModule holds one stage per rank, so the schedules with
# two stages per rank run on torch.distributed.pipelining; 1F1B and GPipe run on either (DeepSpeed by default).
PIPELINE_ENGINES = ("deepspeed", "torch")


def pipeline_engine(geometry: PipelineGeometry, requested: str | None) -> str:
    """The engine for `geometry`'s schedule: `requested` (--pipeline-engine) when it can run it; UsageError if not."""
    if requested == "deepspeed" and geometry.stages_per_rank != 1:
        raise UsageError(
            f"{geometry.schedule} holds {geometry.stages_per_rank} stages per rank, which DeepSpeed's engine cannot "
            "run; drop --pipeline-engine deepspeed (it runs on torch.distributed.pipelining)"
        )
    if requested is not None:
        return requested
    return "deepspeed" if geometry.stages_per_rank == 1 else "torch"
