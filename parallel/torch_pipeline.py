"""Pipeline parallel through torch.distributed.pipelining: all six schedules of the spec, replicas for data parallel.

DeepSpeed's engine holds one stage per process, so the interleaved, looped and zero-bubble schedules (two stages per
process) run here; 1F1B and GPipe run here too with ``--pipeline-engine torch``. The stages are cut from the same
layer list as DeepSpeed's (``models.pipeline_layers``) and keep its parameter names (``{layer}.<param>``,
``tied_modules.embed.<param>``), so the name conversion and the layout-independent checkpoints are shared.

Ranks form a 2-D mesh (pp x dp): rank = pp_rank * replicas + replica, as in DeepSpeed's topology. Each pipeline
rank holds ``stages_per_rank`` stages: stages r and r + K for the looped schedules and, for ZBVZeroBubble, the
V shape r and 2K - 1 - r (the schedule needs the last stage back on rank 0; a looped assignment fails inside torch
with a meaningless allocation error, so the mapping is built here from the schedule, never chosen by the user).

Data parallel across pipelines uses FSDP2's ``replicate`` on the dp axis. NOTE: not DistributedDataParallel: its
module wrapper breaks the stage's shape-inference pass, and the zero-bubble schedules compute weight gradients
outside the autograd hooks DDP relies on, so replicas would silently never be averaged. The pipeline stage drives
FSDP2's gradient reduction itself at the end of each step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import data
import models
from console import say
from lifecycle.staging import build_tokenizer
from monitor.meter import Meter
from monitor.samples import eval_metrics, eval_sums
from optim import load_optimizer_state_by_name, optimizer_state_by_name
from optim.clipping import clip_, global_norm

from .build import assemble_model, build_model, build_optimizer, data_streams, label_count, micro_batches, start_batches
from .layout import Run, start_process

V_SHAPED = {"ScheduleZBVZeroBubble"}  # schedules whose rank r holds stages r and 2K - 1 - r


def rank_stages(pp_rank: int, ranks: int, stages_per_rank: int, v_shape: bool) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, ascending: looped (r, r + K, ...) or V-shaped (r, 2K-1-r)."""
    if v_shape:
        if stages_per_rank != 2:
            raise ValueError(f"a V-shaped pipeline holds 2 stages per rank, not {stages_per_rank}")
        return [pp_rank, 2 * ranks - 1 - pp_rank]
    return [pp_rank + k * ranks for k in range(stages_per_rank)]


def stage_layers(num_blocks: int, stages: int) -> list[range]:
    """Indices into ``models.pipeline_layers`` of each stage: the blocks split evenly (later stages take the
    remainder), the embedding with the first stage, the final norm and the head with the last."""
    bounds = [1 + s * num_blocks // stages for s in range(stages + 1)]
    bounds[0], bounds[-1] = 0, num_blocks + 3
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's full local copy (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


class StageModule(nn.Module):
    """Layers ``layer_ids`` of ``models.pipeline_layers`` called in order on the stage tuple.

    Submodules are named as in DeepSpeed's PipelineModule: ``{layer index}`` and ``tied_modules.{key}`` for the
    tied embedding, whose last use runs the spec's ``forward_fn`` (the head fused with the loss).
    """

    def __init__(self, specs: list, layer_ids: range):
        from deepspeed.pipe import TiedLayerSpec  # imported here, as in models.pipeline_layers: only for --pipeline

        super().__init__()
        self.calls: list[tuple[str, object]] = []  # (submodule name, forward_fn or None) in layer order
        for idx in layer_ids:
            spec = specs[idx]
            if isinstance(spec, TiedLayerSpec):
                if not hasattr(self, "tied_modules"):
                    self.tied_modules = nn.ModuleDict()
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                self.calls.append((f"tied_modules.{spec.key}", spec.forward_fn))
            else:
                self.add_module(str(idx), spec.build())
                self.calls.append((str(idx), None))

    def forward(self, *inputs: torch.Tensor):
        x = inputs
        for name, forward_fn in self.calls:
            module = self.get_submodule(name)
            x = module(x) if forward_fn is None else forward_fn(module, x)
        return x  # the stage tuple, or the last stage's summed loss (a scalar)


def _join(backend: str) -> None:
    if not dist.is_initialized():  # train.py joins first (parallel/group.py)
        dist.init_process_group(backend)


class TorchPipeline:
    """torch.distributed.pipelining: each rank holds 1 or 2 stages of one of ``replicas`` pipeline copies."""

    place = None  # checkpoints are read whole (see lifecycle.checkpoint.load_checkpoint)

    def __init__(self, run: Run):
        args, self.run, geo = run.args, run, run.pipeline
        self.process = start_process(args, _join)
        self.tokenizer = build_tokenizer(run, self.process.is_main, self.barrier)
        self.byte_lengths = torch.as_tensor(data.token_byte_lengths(self.tokenizer))  # bits per byte at each eval

        # The mesh: pipeline ranks x replicas.
        ranks, replicas = geo.ranks, geo.replicas
        mesh = init_device_mesh(self.process.device.type, (ranks, replicas), mesh_dim_names=("pp", "dp"))
        self.pp_rank, self.replica = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
        self.pp_group = mesh["pp"].get_group()
        v_shape = geo.schedule in V_SHAPED
        self._stages_of = lambda r: rank_stages(r, ranks, geo.stages_per_rank, v_shape)
        self.stage_ids = self._stages_of(self.pp_rank)
        self.first, self.last = 0 in self.stage_ids, geo.stages - 1 in self.stage_ids

        # This rank's stages, with the single-process model's initial weights.
        cfg = run.model_cfg
        specs = models.pipeline_layers(cfg, args.attn_implementation, args.activation_checkpointing)
        layers = stage_layers(cfg.num_hidden_layers, geo.stages)
        full = build_model(run, torch.float32).state_dict()
        self.modules: dict[int, StageModule] = {}
        for s in self.stage_ids:
            module = StageModule(specs, layers[s])
            models.load_pipeline_state(module, full, cfg)
            module.to(device=self.process.device, dtype=self.process.param_dtype)
            if self.process.autocast:  # bf16 autocast over fp32 weights, as on DDP
                module.forward = torch.autocast(self.process.device.type, dtype=torch.bfloat16)(module.forward)
            if replicas > 1:
                replicate(module, mesh=mesh["dp"])
                module.set_gradient_divide_factor(1.0)  # the loss is already normalised by the global label count
            self.modules[s] = module
        pipe_names = {n: n for m in self.modules.values() for n, _ in m.named_parameters()}
        self.to_model_name = {v: k for k, v in models.from_pipeline_state_dict(pipe_names, cfg).items()}
        # NOTE: the optimizer steps plain tensors that share storage with each replica's copy of the weights
        # (replicate keeps them equal by averaging gradients), so every update rule runs as in one process:
        # Adafactor's factored statistics and bf16 rounding do not support DTensors.
        self.params = [(p, self._plain(p)) for m in self.modules.values() for p in m.parameters()]
        holder = nn.Module()
        for i, (_, plain) in enumerate(self.params):
            holder.register_parameter(f"p{i}", plain)
        model_names = {p: self.to_model_name[n] for m in self.modules.values() for n, p in m.named_parameters()}
        self.names = {plain: model_names[p] for p, plain in self.params}
        self.optimizer = build_optimizer(run, holder)
        self.tied_group = self._tied_group(ranks, replicas, v_shape) if cfg.tie_word_embeddings else None

        stages = [
            pipelining.PipelineStage(
                self.modules[s],
                s,
                geo.stages,
                self.process.device,
                group=self.pp_group,
                **self._shapes(s, args.max_length),
            )
            for s in self.stage_ids
        ]
        schedule_class = getattr(pipelining, geo.schedule)
        options = dict(n_microbatches=geo.micro_batches, loss_fn=self._loss, scale_grads=False)
        self.schedule = schedule_class(stages[0] if geo.stages_per_rank == 1 else stages, **options)
        self.normalizer = torch.ones((), device=self.process.device)
        # The schedule hands the loss function one target per micro-batch; the labels travel with the activations,
        # so the target is only the micro-batch's index.
        self.targets = torch.arange(geo.micro_batches, device=self.process.device)
        say(
            f"pipeline: {geo.stages} stages x {replicas} replicas{' (FSDP2 replicate)' if replicas > 1 else ''} on "
            f"torch.distributed.pipelining, {geo.schedule}, "
            f"{geo.micro_batches} micro-batches of {geo.micro_batch_size} sequences per step and replica; rank "
            f"{self.process.rank} holds stages {self.stage_ids} of replica {self.replica}"
        )

        # The rank holding stage 0 feeds its replica's rows of each global batch (as DDP ranks replica * K ..
        # replica * K + K - 1 would train on them); the labels travel with the activations to the last stage.
        rows = ranks * args.batch_size
        self.eval_micro_batches = args.eval_batches * rows // geo.micro_batch_size  # per replica
        self.stream, self.eval_set = None, None
        if self.first:
            self.stream, evals = data_streams(run, self.tokenizer, rows, self.replica, replicas)
            self.eval_set = micro_batches(evals, geo.micro_batch_size)
        self.batches = None

    def _shapes(self, stage: int, length: int) -> dict:
        """Example tensors of a stage's inputs and outputs (one micro-batch).

        NOTE: given, so torch skips its shape-inference forward, which would feed the loss uninitialised labels.
        Float examples must require grad, or no gradient is planned for them.
        """
        rows, cfg, geo = self.run.pipeline.micro_batch_size, self.run.model_cfg, self.run.pipeline
        ids = torch.zeros(rows, length, dtype=torch.long, device=self.process.device)
        hidden = torch.zeros(rows, length, cfg.hidden_size, dtype=self.process.param_dtype, device=self.process.device)
        hidden.requires_grad_()
        inputs = (ids if stage == 0 else hidden, ids, ids, ids)
        last = stage == geo.stages - 1
        outputs = torch.zeros((), device=self.process.device, requires_grad=True) if last else (hidden, ids, ids, ids)
        return {"input_args": inputs, "output_args": outputs}

    def _tied_group(self, ranks: int, replicas: int, v_shape: bool):
        """The two ranks of this replica that hold the tied embedding (stage 0) and head (last stage).

        None when one rank holds both (V shape). Every rank creates every replica's group, as new_group requires.
        """
        if v_shape or ranks == 1:
            return None
        mine = None
        for replica in range(replicas):
            group = dist.new_group([replica, (ranks - 1) * replicas + replica])
            if replica == self.replica and self.pp_rank in (0, ranks - 1):
                mine = group
        return mine

    @staticmethod
    def _plain(p: nn.Parameter) -> nn.Parameter:
        """`p` itself, or for a replicated DTensor a parameter sharing its local tensor's storage."""
        if not isinstance(p, DTensor):
            return p
        plain = nn.Parameter(p.to_local().detach(), requires_grad=p.requires_grad)
        if plain.data_ptr() != p.to_local().data_ptr():
            raise RuntimeError("a replicated parameter's local tensor is not shared with the optimizer")
        return plain

    def _loss(self, loss_sum: torch.Tensor, _index: torch.Tensor) -> torch.Tensor:
        return loss_sum / self.normalizer

    def barrier(self) -> None:
        dist.barrier()

    def start_data(self, data_state: dict | None):
        self.batches = start_batches(self.stream, data_state)
        return self.batches

    def _inputs(self, batches: list[dict]) -> tuple[torch.Tensor, ...]:
        rows = {k: torch.cat([b[k] for b in batches]).to(self.process.device) for k in batches[0]}
        return rows["input_ids"], rows["position_ids"], rows["doc_ids"], rows["labels"]

    def _run(self, batches: list[dict] | None) -> torch.Tensor:
        """One schedule call over this replica's micro-batches; returns the sum of this rank's micro-batch losses."""
        inputs = self._inputs(batches) if self.first else ()
        target = {"target": self.targets} if self.last else {}
        losses: list[torch.Tensor] = []
        self.schedule.step(*inputs, losses=losses, return_outputs=False, **target)
        total = torch.zeros((), dtype=torch.float64, device=self.process.device)
        for loss in losses:
            total += loss.detach().double()
        return total

    @torch.no_grad()
    def _forward(self, batch: dict | None) -> torch.Tensor:
        """[summed nats, labels, text nats, bytes] of one held-out micro-batch (`monitor.samples.eval_sums`), its
        activations handed from stage to stage in order (zeros on ranks without the last stage).

        NOTE: not the schedule's eval(): in torch 2.13 ZBVZeroBubble's runtime still tries to hand a backward
        between its two local stages when run forward-only, and fails. Evaluation needs no overlap.
        """
        geo, replicas = self.run.pipeline, self.run.pipeline.replicas
        owner = {s: r for r in range(geo.ranks) for s in self._stages_of(r)}
        x = self._inputs([batch]) if self.first else None
        for s in range(geo.stages):
            if s not in self.modules:
                continue
            if s > 0 and owner[s - 1] != self.pp_rank:
                x = tuple(torch.empty_like(t) for t in self._shapes(s, self.run.args.max_length)["input_args"])
                for t in x:
                    dist.recv(t, src=owner[s - 1] * replicas + self.replica)
            if s == geo.stages - 1:  # the head: each label's nats, summed into [nats, labels, text nats, bytes]
                with models.per_token_losses(self.modules[s]):
                    return eval_sums(self.modules[s](*x), x[3], self.byte_lengths)
            x = self.modules[s](*x)
            if s < geo.stages - 1 and owner[s + 1] != self.pp_rank:
                for t in x:
                    dist.send(t.contiguous(), dst=owner[s + 1] * replicas + self.replica)
        return torch.zeros(4, dtype=torch.float64, device=self.process.device)  # this rank holds no last stage

    def train_step(self, meter: Meter) -> tuple[float, float]:
        geo, accum = self.run.pipeline, self.run.args.gradient_accumulation_steps
        labels, batches = torch.zeros((), dtype=torch.float64, device=self.process.device), None
        if self.batches is not None:
            batches = [next(self.batches) for _ in range(accum)]
            for mb in micro_batches(batches, geo.micro_batch_size):
                meter.add_micro_batch(mb["doc_ids"])
            labels += label_count(batches)
        # NOTE: normalise by the label count of the whole global batch (every replica's rows), so the loss and the
        # gradients summed over micro-batches and replicas equal one process's over the same rows.
        dist.all_reduce(labels)  # only the ranks feeding stage 0 hold rows
        self.normalizer = labels.float()
        loss = self._run(batches)
        dist.all_reduce(loss)  # only the ranks holding the last stage hold losses: every rank logs the sum
        norm = self._sync_and_clip()
        for p, plain in self.params:
            plain.grad = None if p.grad is None else local(p.grad)
        self.optimizer.step()
        for p, plain in self.params:
            p.grad = plain.grad = None
        return float(loss), norm

    def _sync_and_clip(self) -> float:
        """Sum the tied embedding/head gradient over its two holders, then clip with the global norm over every
        stage (the tied weight counted once), as one process would. Returns the pre-clip norm."""
        tied = [(s, p) for s, m in self.modules.items() for n, p in m.named_parameters() if n.startswith("tied_")]
        if len(tied) == 2:  # both on this rank (V shape)
            total = local(tied[0][1].grad) + local(tied[1][1].grad)
            for _, p in tied:
                local(p.grad).copy_(total)
        elif tied and self.tied_group is not None:
            dist.all_reduce(local(tied[0][1].grad), group=self.tied_group)
        grads, counted = [], []
        for s, module in self.modules.items():
            for name, p in module.named_parameters():
                if p.grad is None:
                    continue
                grads.append(local(p.grad))
                if s == 0 or not name.startswith("tied_"):
                    counted.append(grads[-1])
        norm = global_norm(counted, self.pp_group, self.process.device)  # replicas hold the same reduced gradients
        clip_(grads, self.run.args.max_grad_norm, norm)
        return float(norm)

    def evaluate(self) -> dict:
        """Loss and bits per byte over the held-out rows of every replica, forward passes only."""
        totals = torch.zeros(4, dtype=torch.float64, device=self.process.device)
        for batch in self.eval_set if self.eval_set is not None else [None] * self.eval_micro_batches:
            totals += self._forward(batch).double()  # _forward runs without gradients
        dist.all_reduce(totals)  # the sums are held by the ranks with the last stage, one per replica
        return eval_metrics(totals)

    def model_part(self) -> dict | None:
        # A tied embedding/head lives with the first and the last stage: the first one saves it. Replicas hold copies.
        if self.replica != 0:
            return None
        part = {}
        for s, module in self.modules.items():
            for name, t in module.state_dict().items():
                if s == 0 or not name.startswith("tied_"):
                    part[self.to_model_name[name]] = local(t).detach().cpu().clone()
        return part

    def optimizer_part(self) -> dict | None:
        if self.replica != 0:
            return None
        return optimizer_state_by_name(self.optimizer, self.names)

    def checkpoint_parts(self) -> tuple[dict | None, dict | None]:
        return self.model_part(), self.optimizer_part()

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        converted = models.to_pipeline_state_dict(model_state, self.run.model_cfg)
        with torch.no_grad():
            for module in self.modules.values():
                for name, t in module.state_dict().items():
                    local(t).copy_(converted[name])
        load_optimizer_state_by_name(self.optimizer, optimizer_state, self.names)
        # NOTE: the two copies of a tied weight on one rank (V shape) were handed the same saved tensors: each
        # needs its own, or the optimizer updates the shared moments twice per step.
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v):
                    state[k] = v.clone()

    def gather_model(self) -> models.Transformer | None:
        """Every rank sends its stages' weights to the main rank, which assembles the whole model on the CPU."""
        parts = [None] * self.process.world if self.process.is_main else None
        dist.gather_object(self.model_part(), parts, dst=0)
        if not self.process.is_main:
            return None
        return assemble_model(self.run, parts, self.process.param_dtype)

    def sample_model(self) -> models.Transformer | None:
        return self.gather_model()  # the main rank samples alone

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        self.barrier()
        dist.destroy_process_group()
