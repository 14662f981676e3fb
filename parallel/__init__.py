"""Layouts: how the processes of a run share the model. train.py's one loop drives any of them (`Layout` in
layout.py is the contract; `start_process` the set-up they share).

    DataParallel              one process or DDP through Accelerate (ddp.py)
    FullyShardedDataParallel  FSDP2 fully_shard, launched by Accelerate with an FSDP config (fsdp.py)
    Pipeline                  DeepSpeed PipelineModule, one stage per process (pipeline.py, deepspeed_engine.py)
    TorchPipeline             torch.distributed.pipelining, every schedule of the spec (torch_pipeline.py)

geometry.py turns a batch into micro-batches and stages and picks a schedule's engine; build.py builds the seeded
model, the optimizer and the data streams every layout starts from.
"""

from .ddp import DataParallel
from .fsdp import FullyShardedDataParallel, fsdp_requested
from .geometry import PIPELINE_ENGINES, PipelineGeometry, format_pipeline, pipeline_engine, pipeline_geometry
from .layout import Layout, Process, Run, start_process
from .pipeline import Pipeline
from .torch_pipeline import TorchPipeline

__all__ = [
    "PIPELINE_ENGINES",
    "DataParallel",
    "FullyShardedDataParallel",
    "Layout",
    "Pipeline",
    "PipelineGeometry",
    "Process",
    "Run",
    "TorchPipeline",
    "format_pipeline",
    "fsdp_requested",
    "pipeline_engine",
    "pipeline_geometry",
    "start_process",
]
