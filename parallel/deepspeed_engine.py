"""DeepSpeed pipeline-engine plumbing: the GPipe schedule, the global-norm clip, the config filled from the plan.

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

from optim.clipping import clip_, global_norm


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
    base, losses = engine._INSTRUCTION_MAP, {}

    def forward(self, buffer_id):
        base[ds.ForwardPass](self, buffer_id)
        if self.is_last_stage():
            losses[buffer_id] = self.loss

    def backward(self, buffer_id):
        if self.is_last_stage():
            self.loss = losses.pop(buffer_id)
        base[ds.BackwardPass](self, buffer_id)

    engine._INSTRUCTION_MAP = {**base, ds.ForwardPass: forward, ds.BackwardPass: backward}


def clip_over_all_stages(engine, max_norm: float) -> list[float]:
    """Clip with the global gradient norm over every stage's parameters, as one process would; returns a list that
    receives each step's pre-clip norm (the same value on every stage).

    NOTE: DeepSpeed's own ``gradient_clipping`` counts only the gradients of model-parallel rank 0, which in a
    pipeline is the first stage alone: with clipping active a 2-stage run drifts from one process within a few
    steps. So the config sets it to 0 and this runs in its place, after the gradients (tied ones included) are
    reduced and before the optimizer step. A tied embedding/head lives on the first and last stage with the same
    reduced gradient; only the first stage counts it. ``max_norm`` 0 measures the norm without clipping.
    """
    base, norms = engine._INSTRUCTION_MAP, []

    def optimizer_step(self, lr_kwargs=None):
        grads, counted = [], []
        for name, p in self.module.named_parameters():
            if p.grad is not None:
                grads.append(p.grad)
                if self.is_first_stage() or not name.startswith("tied_modules."):
                    counted.append(p.grad)
        norm = global_norm(counted, self.grid.get_pipe_parallel_group(), self.device)
        clip_(grads, max_norm, norm)
        norms.append(float(norm))
        base[ds.OptimizerStep](self, lr_kwargs)

    engine._INSTRUCTION_MAP = {**base, ds.OptimizerStep: optimizer_step}
    return norms


def deepspeed_config(path: Path, *, micro_batch: int, micro_batches: int, replicas: int = 1) -> tuple[dict, dict]:
    """``ds_configs/pipeline.json`` with the batch fields filled from our plan (one source of truth for batch size).

    Clipping is ours (``clip_over_all_stages``) and mixed precision is autocast, as on the DDP path, so the
    engine's ``gradient_clipping`` and ``bf16`` stay off. ``micro_batches`` is per replica (pipeline copy), so the
    engine's ``train_batch_size`` is micro_batch x micro_batches x replicas. Returns (DeepSpeed config,
    PipelineModule options).
    """
    config = json.loads(Path(path).read_text())
    module_options = config.pop("pipeline")
    config.update(
        train_batch_size=micro_batch * micro_batches * replicas,
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=micro_batches,
        gradient_clipping=0.0,
        bf16={"enabled": False},
    )
    return config, module_options
