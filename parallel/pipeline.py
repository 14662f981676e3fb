"""Pipeline parallel through DeepSpeed's PipelineModule: one stage per process, the spec's micro-batches, and
data-parallel replicas of the pipeline (``--pipeline-stages``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import data
import models
from console import say
from lifecycle.staging import build_tokenizer
from monitor.meter import Meter
from monitor.samples import eval_metrics
from optim import load_optimizer_state_by_name, optimizer_state_by_name

from .build import assemble_model, build_model, build_optimizer, data_streams, label_count, micro_batches, start_batches
from .layout import Run, start_process

CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "pipeline.json"


class Pipeline:
    """DeepSpeed's PipelineModule: each rank holds one stage; a global batch is the spec's micro-batches.

    With ``--pipeline-stages K`` below the world size, DeepSpeed's topology makes world / K pipelines (ranks
    stage * replicas + replica); each replica trains on its own rows of the global batch and the engine averages
    gradients across replicas before the optimizer step.
    """

    place = None  # checkpoints are read whole (see lifecycle.checkpoint.load_checkpoint)

    def __init__(self, run: Run):
        import deepspeed
        from deepspeed.pipe import PipelineModule

        from .deepspeed_engine import clip_over_all_stages, deepspeed_config, use_gpipe  # deepspeed: only here

        args, self.run, geo = run.args, run, run.pipeline
        self.process = start_process(args, lambda backend: deepspeed.init_distributed(dist_backend=backend))
        self.tokenizer = build_tokenizer(run, self.process.is_main, self.barrier)
        ds_config, pipe_options = deepspeed_config(
            CONFIG,
            micro_batch=geo.micro_batch_size,
            micro_batches=geo.micro_batches,
            replicas=geo.replicas,
        )
        net = PipelineModule(
            layers=models.pipeline_layers(run.model_cfg, args.attn_implementation, args.activation_checkpointing),
            num_stages=geo.ranks,
            loss_fn=models.pipeline_loss,
            **pipe_options,
        )
        models.load_pipeline_state(net, build_model(run, torch.float32).state_dict(), run.model_cfg)  # same init
        net.to(device=self.process.device, dtype=self.process.param_dtype)
        if self.process.autocast:  # mixed precision as on DDP: bf16 autocast over fp32 weights
            net.forward = torch.autocast(self.process.device.type, dtype=torch.bfloat16)(net.forward)
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
            f"pipeline: {geo.stages} stages x {geo.replicas} replicas, {geo.micro_batches} micro-batches of "
            f"{geo.micro_batch_size} sequences per step and replica, {geo.schedule}; DeepSpeed config "
            f"{json.dumps(ds_config)}"
        )
        grid = self.engine.grid
        self.replica, self.dp_group = grid.get_data_parallel_id(), grid.get_data_parallel_group()
        # The first stage feeds inputs and the last one labels: both read their replica's rows of each global batch
        # (the rows DDP ranks replica * K .. replica * K + K - 1 would train on), cut into micro-batches.
        feeds = self.engine.is_first_stage() or self.engine.is_last_stage()
        rows, replicas = geo.ranks * args.batch_size, geo.replicas
        self.stream, evals = data_streams(run, self.tokenizer, rows, self.replica, replicas, train=feeds)
        self.eval_set = micro_batches(evals, geo.micro_batch_size)
        self.byte_lengths = torch.as_tensor(data.token_byte_lengths(self.tokenizer))  # bits per byte at each eval
        self.batches = None

    def barrier(self) -> None:
        torch.distributed.barrier()

    def start_data(self, data_state: dict | None):
        self.batches = start_batches(self.stream, data_state)
        return self.batches

    def _items(self, batches: list[dict], byte_lengths: torch.Tensor | None = None):
        """What the engine loads per micro-batch: the stage inputs, and (labels, num_items) for the loss; for
        evaluation (`byte_lengths` given) also each label's bytes, for bits per byte.

        NOTE: the engine averages over micro-batches and then over replicas; num_items = (labels of the whole
        global batch) / (micro-batches x replicas) turns that into sum / label count of the global batch. Every rank
        of a data-parallel group calls this at the same point (all of them read data or none).
        """
        labels = torch.tensor(label_count(batches), dtype=torch.float64, device=self.process.device)
        if self.run.pipeline.replicas > 1:
            torch.distributed.all_reduce(labels, group=self.dp_group)
        num_items = (labels / (len(batches) * self.run.pipeline.replicas)).float().cpu()
        return self._feed(batches, num_items, byte_lengths)

    @staticmethod
    def _feed(batches: list[dict], num_items: torch.Tensor, byte_lengths: torch.Tensor | None):
        """The stage inputs and (labels, num_items[, bytes per label]) per micro-batch; bytes only for evaluation."""
        for b in batches:
            target = (b["labels"], num_items)
            if byte_lengths is not None:
                target += (byte_lengths[b["labels"].clamp(min=0)] * (b["labels"] != data.IGNORE_INDEX),)
            yield (b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"]), target

    def train_step(self, meter: Meter) -> tuple[float, float]:
        items = None
        if self.batches is not None:
            accum = self.run.args.gradient_accumulation_steps
            batches = micro_batches([next(self.batches) for _ in range(accum)], self.run.pipeline.micro_batch_size)
            for b in batches:
                meter.add_micro_batch(b["doc_ids"])
            items = self._items(batches)
        loss = self.engine.train_batch(items).item()  # the same global loss on every stage
        return loss, self.grad_norms.pop()

    def evaluate(self) -> dict:
        # The last stage's loss_fn returns [loss share, text nats, bytes] per micro-batch (models.pipeline_loss);
        # DeepSpeed averages them over micro-batches, which keeps the loss and the ratio text nats / bytes.
        # NOTE: eval_batch adds each micro-batch's output into the engine's running total, which train_batch resets
        # but eval_batch does not: left holding the last step's scalar loss, it cannot take our vectors.
        self.engine.total_loss = None
        with models.per_token_losses(self.net):
            out = self.engine.eval_batch(
                self._items(self.eval_set, self.byte_lengths), num_micro_batches=len(self.eval_set), bcast_loss=False
            )
        self.engine.train()
        last = (
            self.process.world - 1
        )  # NOTE: a last stage (ranks are stage-major); its output is averaged over replicas
        sums = out.detach().to(self.process.device, torch.float64) if self.process.rank == last else None
        sums = sums if sums is not None else torch.zeros(3, dtype=torch.float64, device=self.process.device)
        torch.distributed.broadcast(sums, src=last)
        loss, text_nats, num_bytes = sums.tolist()
        bpb = eval_metrics(torch.tensor([0.0, 1.0, text_nats, num_bytes]))["bits_per_byte"]
        return {"loss": loss, "bits_per_byte": bpb}

    def model_part(self) -> dict | None:
        # A tied embedding/head lives on the first and last stage: the first one saves it. Replicas hold copies.
        if self.replica != 0:
            return None
        first = self.engine.is_first_stage()
        state = {n: t for n, t in self.net.state_dict().items() if first or not n.startswith("tied_modules.")}
        return {self.to_model_name[n]: t.detach().cpu() for n, t in state.items()}

    def optimizer_part(self) -> dict | None:
        return optimizer_state_by_name(self.optimizer, self.names) if self.replica == 0 else None

    def checkpoint_parts(self) -> tuple[dict | None, dict | None]:
        return self.model_part(), self.optimizer_part()

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        models.load_pipeline_state(self.net, model_state, self.run.model_cfg)
        load_optimizer_state_by_name(self.optimizer, optimizer_state, self.names)

    def gather_model(self) -> models.Transformer | None:
        """Every stage sends its weights to the main rank, which assembles the whole model on the CPU."""
        parts = [None] * self.process.world if self.process.is_main else None
        torch.distributed.gather_object(self.model_part(), parts, dst=0)
        if not self.process.is_main:
            return None
        return assemble_model(self.run, reversed(parts), self.process.param_dtype)  # stage 0's tied copies kept

    def sample_model(self) -> models.Transformer | None:
        return self.gather_model()  # the main rank samples alone

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        self.barrier()
