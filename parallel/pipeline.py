"""Pipeline parallel through DeepSpeed's PipelineModule: one stage per process, the spec's micro-batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import data
import models
from monitor.meter import Meter
from monitor.progress import say
from schedule.optim import load_optimizer_state_by_name, optimizer_state_by_name

from .common import Run, bad_input, build_model, build_optimizer, build_tokenizer, label_count, precision

CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "pipeline.json"


class Pipeline:
    """DeepSpeed's PipelineModule: each rank holds one stage; a global batch is the spec's micro-batches."""

    place = None  # checkpoints are read whole (see monitor.checkpoint.load_checkpoint)

    def __init__(self, run: Run):
        import deepspeed
        from deepspeed.pipe import PipelineModule

        from models.pipe_engine import clip_over_all_stages, deepspeed_config, use_gpipe

        args, self.run, geo = run.args, run, run.pipeline
        cpu = not torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend=args.dist_backend or ("gloo" if cpu else "nccl"))
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if not cpu:
            torch.cuda.set_device(self.device)
        self.is_main, self.can_checkpoint = self.rank == 0, True
        self.dtype, pure_bf16 = precision(args, self.device.type)
        self.tokenizer = build_tokenizer(run, self.is_main, self.barrier)
        ds_config, pipe_options = deepspeed_config(
            CONFIG,
            micro_batch=geo.micro_batch_size,
            micro_batches=geo.micro_batches,
        )
        net = PipelineModule(
            layers=models.pipeline_layers(run.model_cfg, args.attn_implementation, args.activation_checkpointing),
            num_stages=self.world,
            loss_fn=models.pipeline_loss,
            **pipe_options,
        )
        models.load_pipeline_state(net, build_model(run, torch.float32).state_dict(), run.model_cfg)  # same init
        self.param_dtype = torch.bfloat16 if pure_bf16 else torch.float32
        net.to(device=self.device, dtype=self.param_dtype)
        if self.dtype == torch.bfloat16 and not pure_bf16:  # mixed precision as on DDP: bf16 autocast, fp32 weights
            net.forward = torch.autocast(self.device.type, dtype=torch.bfloat16)(net.forward)
        # This stage's parameter names -> the Transformer's, by which checkpoints store weights and optimizer state.
        pipe_names = {n: n for n, _ in net.named_parameters()}
        self.to_model_name = {v: k for k, v in models.from_pipeline_state_dict(pipe_names, run.model_cfg).items()}
        self.names = {p: self.to_model_name[n] for n, p in net.named_parameters()}
        self.optimizer = build_optimizer(run, net)
        self.engine, *_ = deepspeed.initialize(model=net, optimizer=self.optimizer, config=ds_config)
        self.net = net
        if geo.schedule == "ScheduleGPipe":
            use_gpipe(self.engine)
        self.grad_norms = clip_over_all_stages(self.engine, args.max_grad_norm)
        say(
            f"pipeline: {geo.stages} stages, {geo.micro_batches} micro-batches of {geo.micro_batch_size} sequences "
            f"per step, {geo.schedule}; DeepSpeed config {json.dumps(ds_config)}"
        )
        # The first stage feeds inputs and the last one labels: both read the same single stream of micro-batches.
        feeds = self.engine.is_first_stage() or self.engine.is_last_stage()
        with bad_input():
            self.stream = (
                data.PackedStream(run.mix, self.tokenizer, args.max_length, geo.micro_batch_size, seed=args.seed)
                if feeds
                else None
            )
            per_step = geo.micro_batches // args.gradient_accumulation_steps  # eval micro-batches per global batch
            self.eval_set = data.eval_batches(
                run.mix, self.tokenizer, args.max_length, geo.micro_batch_size, args.eval_batches * per_step
            )
        self.batches = None

    def barrier(self) -> None:
        torch.distributed.barrier()

    def start_data(self):
        self.batches = None if self.stream is None else data.Prefetcher(self.stream)
        return self.batches

    @staticmethod
    def _items(batches: list[dict]):
        """What the engine loads per micro-batch: the stage inputs, and (labels, num_items) for the loss."""
        num_items = torch.tensor(label_count(batches) / len(batches))
        for b in batches:
            yield (b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"]), (b["labels"], num_items)

    def train_step(self, meter: Meter) -> tuple[float, float]:
        items = None
        if self.batches is not None:
            batches = [next(self.batches) for _ in range(self.run.pipeline.micro_batches)]
            for b in batches:
                meter.add_micro_batch(b["doc_ids"])
            items = self._items(batches)
        loss = self.engine.train_batch(items).item()  # the same global loss on every stage
        return loss, self.grad_norms.pop()

    def evaluate(self) -> float:
        loss = self.engine.eval_batch(self._items(self.eval_set), num_micro_batches=len(self.eval_set)).item()
        self.engine.train()
        return loss

    def model_part(self) -> dict:
        # A tied embedding/head lives on the first and last stage: the first one saves it.
        first = self.engine.is_first_stage()
        state = {n: t for n, t in self.net.state_dict().items() if first or not n.startswith("tied_modules.")}
        return {self.to_model_name[n]: t.detach().cpu() for n, t in state.items()}

    def optimizer_part(self) -> dict:
        return optimizer_state_by_name(self.optimizer, self.names)

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        models.load_pipeline_state(self.net, model_state, self.run.model_cfg)
        load_optimizer_state_by_name(self.optimizer, optimizer_state, self.names)

    def gather_model(self) -> models.Transformer | None:
        """Every stage sends its weights to the main rank, which assembles the whole model on the CPU."""
        parts = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(self.model_part(), parts, dst=0)
        if not self.is_main:
            return None
        model = models.Transformer(self.run.model_cfg, self.run.args.attn_implementation)
        model.load_state_dict({name: t for part in reversed(parts) for name, t in part.items()})
        return model.to(self.param_dtype)

    def sample_model(self) -> models.Transformer | None:
        return self.gather_model()  # the main rank samples alone

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        self.barrier()
