"""Layouts: how the processes of a run share the model. train.py's one loop drives any of them.

Each layout sets device, rank, world, is_main, tokenizer, optimizer and stream (None where a rank reads no
data) and implements: barrier(), start_data(), train_step(meter) -> (global loss, pre-clip global grad norm),
evaluate() -> {loss, bits_per_byte} over the held-out set, model_part() / optimizer_part() (this rank's share of a
checkpoint, by Transformer parameter name), place (None, or how a sharded layout receives a sharded checkpoint: see
monitor.checkpoint.load_checkpoint), load(model_state, optimizer_state), gather_model() (the whole model on the
main rank), sample_model() (the model this rank runs to sample text; None: it does not take part), close().

    DataParallel              one process or DDP through Accelerate (parallel/ddp.py)
    FullyShardedDataParallel  FSDP2 fully_shard, launched by Accelerate with an FSDP config (parallel/fsdp.py)
    Pipeline                  DeepSpeed PipelineModule, one stage per process (parallel/pipeline.py)
    TorchPipeline             torch.distributed.pipelining, every schedule of the spec (parallel/torch_pipeline.py)
"""

from .common import PIPELINE_ENGINES, Run, UsageError, bad_input, pipeline_engine
from .ddp import DataParallel
from .fsdp import FullyShardedDataParallel, fsdp_requested
from .pipeline import Pipeline
from .torch_pipeline import TorchPipeline

__all__ = [
    "PIPELINE_ENGINES",
    "DataParallel",
    "FullyShardedDataParallel",
    "Pipeline",
    "Run",
    "TorchPipeline",
    "UsageError",
    "bad_input",
    "fsdp_requested",
    "pipeline_engine",
]
