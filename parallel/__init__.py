"""Layouts: how the processes of a run share the model. train.py's one loop drives any of them.

Each layout sets device, rank, world, is_main, tokenizer, optimizer and stream (None where a rank reads no
data) and implements: barrier(), start_data(), train_step(meter) -> (global loss, pre-clip global grad norm),
evaluate() -> global eval loss, model_part() / optimizer_part() (this rank's share of a checkpoint, by Transformer
parameter name), load(model_state, optimizer_state), gather_model() (the whole model on the main rank), close().

    DataParallel   one process, DDP or FSDP through Accelerate (parallel/ddp.py)
    Pipeline       DeepSpeed PipelineModule, one stage per process (parallel/pipeline.py)
    TorchPipeline  torch.distributed.pipelining, every schedule of the spec (parallel/torch_pipeline.py)
"""

from .common import PIPELINE_ENGINES, Run, UsageError, bad_input, pipeline_engine
from .ddp import DataParallel
from .pipeline import Pipeline
from .torch_pipeline import TorchPipeline

__all__ = [
    "PIPELINE_ENGINES",
    "DataParallel",
    "Pipeline",
    "Run",
    "TorchPipeline",
    "UsageError",
    "bad_input",
    "pipeline_engine",
]
