"""DeepSpeed pipeline-engine plumbing: the GPipe schedule, the config filled from the plan, the export assembly.

GPipe runs every forward of the batch, then every backward.
DeepSpeed ships 1F1B (``TrainSchedule``), which interleaves forwards and backwards to keep at most ``stages``
micro-batches of activations alive. GPipe keeps all of them (more memory, a larger bubble) but is the simplest
schedule to reason about, and the spec offers it. The engine runs whatever ``_train_schedule()`` returns, so
``use_gpipe(engine)`` swaps it in.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepspeed.runtime.pipe import schedule as ds


class GPipeSchedule(ds.PipeSchedule):
    """All forward passes in micro-batch order, then all backward passes in reverse order, then one update."""

    def steps(self):
        first, last = self.stage_id == 0, self.stage_id == self.stages - 1
        for mb in range(self.micro_batches):
            cmds = [] if first else [ds.RecvActivation(mb)]
            if first or last:
                cmds.append(ds.LoadMicroBatch(mb))
            cmds.append(ds.ForwardPass(mb))
            if not last:
                cmds.append(ds.SendActivation(mb))
            yield cmds
        for mb in reversed(range(self.micro_batches)):
            cmds = [] if last else [ds.RecvGrad(mb)]
            cmds.append(ds.BackwardPass(mb))
            if not first:
                cmds.append(ds.SendGrad(mb))
            yield cmds
        yield [ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        return self.micro_batches  # one buffer per micro-batch: all activations stay alive until the backwards


def use_gpipe(engine) -> None:
    """Make ``engine.train_batch`` run GPipe instead of DeepSpeed's default 1F1B.

    NOTE: DeepSpeed's last stage backpropagates ``engine.loss``, the loss of its most recent forward, which is right
    only when a backward directly follows its forward (1F1B). With all forwards first, the loss of every micro-batch
    is kept by buffer and put back before its backward.
    """
    engine._train_schedule = lambda: GPipeSchedule(
        micro_batches=engine.micro_batches, stages=engine.num_stages, stage_id=engine.stage_id
    )
    base, losses = type(engine)._INSTRUCTION_MAP, {}

    def forward(self, buffer_id):
        base[ds.ForwardPass](self, buffer_id)
        if self.is_last_stage():
            losses[buffer_id] = self.loss

    def backward(self, buffer_id):
        if self.is_last_stage():
            self.loss = losses.pop(buffer_id)
        base[ds.BackwardPass](self, buffer_id)

    engine._INSTRUCTION_MAP = {**base, ds.ForwardPass: forward, ds.BackwardPass: backward}


def deepspeed_config(
    path: Path, *, batch_size: int, grad_accum: int, micro_batch: int, max_grad_norm: float, bf16: bool
) -> tuple[dict, dict]:
    """``ds_configs/pipeline.json`` with the batch fields filled from our plan (one source of truth for batch size).

    Returns (DeepSpeed config, PipelineModule options from its ``pipeline`` section).
    """
    config = json.loads(Path(path).read_text())
    module_options = config.pop("pipeline")
    config.update(
        train_batch_size=batch_size * grad_accum,
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=batch_size // micro_batch * grad_accum,
        gradient_clipping=max_grad_norm,
        bf16={"enabled": bf16},
    )
    return config, module_options


def assemble_stages(stage_files: list[Path], cfg, attn_implementation: str):
    """A full ``Transformer`` from the per-stage safetensors files a pipeline run wrote (for the HF export)."""
    from models.model import Transformer
    from models.pipeline import from_pipeline_state_dict
    from monitor.checkpoint import load_state_dict_file

    merged = {}
    for file in stage_files:
        merged.update(load_state_dict_file(file))
    model = Transformer(cfg, attn_implementation)
    model.load_state_dict(from_pipeline_state_dict(merged, cfg))
    return model
