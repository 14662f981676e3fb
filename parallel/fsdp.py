"""Fully sharded data parallel: torch's FSDP2 (`fully_shard`) over gloo on CPU and nccl on GPUs, one code path.

Accelerate launches the processes (`accelerate launch --config_file accelerate_configs/fsdp.yaml` or `cpu_fsdp.yaml`,
whose `distributed_type: FSDP` sets ACCELERATE_USE_FSDP=true in every process); the sharding is ours, as torchtitan
does it: each decoder block is one FSDP unit, then the root (embedding, final norm, head). Parameters, gradients and
optimizer state are split over the ranks by their first dimension; a block's weights are gathered for its forward
and its backward only. Accelerate's own FSDP plugin is not used: it cannot shard on CPU, and a second code path on
GPUs would be one the tests never run.

Checkpoints: every rank writes its shards through torch.distributed.checkpoint (lifecycle/checkpoint.py), and reads
back the slices it holds, whatever the number of processes that wrote them; a checkpoint of any other layout is
read by name and split here.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor import empty as dtensor_empty

import data
import models
from console import say
from lifecycle.staging import build_tokenizer
from monitor import samples
from monitor.meter import Meter
from optim import load_optimizer_state_by_name, optimizer_state_by_name
from optim.clipping import clip_, global_norm, square_sum

from .build import build_model, build_optimizer, data_streams, label_count, start_batches, to_device
from .layout import Run, start_process


def fsdp_requested() -> bool:
    """True in processes started by `accelerate launch` with an FSDP config (ACCELERATE_USE_FSDP=true)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _join(backend: str) -> None:
    if not dist.is_initialized():  # train.py joins first (parallel/group.py)
        dist.init_process_group(backend)


class FullyShardedDataParallel:
    """FSDP2: every rank trains on its rows of the global batch and holds 1/world of every tensor."""

    def __init__(self, run: Run):
        args, self.run = run.args, run
        self.process = start_process(args, _join)
        self.tokenizer = build_tokenizer(run, self.process.is_main, self.barrier)
        self.byte_lengths = torch.as_tensor(data.token_byte_lengths(self.tokenizer))  # bits per byte at each eval
        # The same seeded initial weights as every other layout, built whole on the CPU, then sharded block by block
        # (each block moves to the device only as its shard).
        model = build_model(run, self.process.param_dtype)
        if self.process.autocast:  # mixed precision as on DDP: bf16 autocast over fp32 weights
            model.forward = torch.autocast(self.process.device.type, dtype=torch.bfloat16)(model.forward)
        self.mesh = init_device_mesh(self.process.device.type, (self.process.world,))
        for block in model.layers:
            fully_shard(block, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        where = f"{self.process.world} processes ({self.process.device.type})"
        say(f"fsdp: {len(model.layers)} blocks and the root sharded over {where}")
        self.model = model
        self.sharded = model
        self.names = {p: name for name, p in model.named_parameters()}
        self.params = dict(model.named_parameters())
        self.optimizer = build_optimizer(run, model)
        self.stream, self.eval_set = data_streams(
            run, self.tokenizer, args.batch_size, self.process.rank, self.process.world
        )
        self.batches = None

    def barrier(self) -> None:
        dist.barrier()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.process.world > 1:
            dist.all_reduce(t)
        return t

    def start_data(self, data_state: dict | None):
        self.batches = start_batches(self.stream, data_state, pin=self.process.device.type == "cuda")
        return self.batches

    def train_step(self, meter: Meter) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [next(self.batches) for _ in range(self.run.args.gradient_accumulation_steps)]
        # NOTE: normalised by the label count of the whole global batch; FSDP averages gradients over the ranks
        # (hence the world factor), and each micro-batch is reduce-scattered as it ends, so no rank ever holds a
        # whole unsharded gradient.
        labels = self.reduce_sum(torch.tensor(label_count(batches), device=self.process.device))
        num_items = labels / self.process.world
        step_loss = torch.zeros((), device=self.process.device)
        for batch in batches:
            meter.add_micro_batch(batch["doc_ids"])
            batch = to_device(batch, self.process.device, self.run.args.attn_implementation == "varlen")
            loss = self.model(**batch, num_items=num_items)
            loss.backward()
            step_loss += loss.detach()
        grad_norm = self.clip_gradients(self.run.args.max_grad_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.reduce_sum(step_loss) / self.process.world, grad_norm  # on the device: read when logged

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to the global norm over every shard; returns the pre-clip norm (inf max_norm only measures it)."""
        grads = [p.grad for p in self.sharded.parameters() if p.grad is not None]
        shards = [g.to_local() for g in grads if isinstance(g, DTensor)]  # each element on one rank: summed over all
        whole = [g for g in grads if not isinstance(g, DTensor)]  # the same on every rank: counted once
        squares = global_norm(shards, dist.group.WORLD, self.process.device).square() + square_sum(whole).to(
            self.process.device
        )
        norm = squares.sqrt()
        clip_(shards + whole, max_norm, norm)
        return norm

    def evaluate(self) -> dict:
        return samples.evaluate(self.model, self.eval_set, self.process.device, self.byte_lengths, self.reduce_sum)

    def sample_model(self) -> torch.nn.Module:
        """Every rank runs the sampling forward (each one gathers the blocks' weights); the main rank prints."""
        return self.model

    # ---- checkpoints: DTensor shards keyed by Transformer name (lifecycle/checkpoint.py writes them with DCP) ----

    def checkpoint_parts(self) -> tuple[dict, dict]:
        return self.sharded.state_dict(), optimizer_state_by_name(self.optimizer, self.names)

    def place(self, kind: str, name: str, key: str | None, shape: torch.Size, dtype: torch.dtype):
        """Where a sharded checkpoint's tensor is read to: an empty DTensor holding this rank's share (see load)."""
        param = self.params.get(name)
        if param is None:
            return None
        placements = placements_for(param, shape, key)
        if placements is None:
            return torch.empty(shape, dtype=dtype)
        return dtensor_empty(shape, dtype=dtype, device_mesh=self.mesh, placements=placements)

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        """Load shards read in place (a sharded checkpoint) or whole tensors by name (any other layout's)."""
        own = self.sharded.state_dict()
        self.sharded.load_state_dict({name: shard_like(own[name], model_state[name]) for name in own})
        state = {
            name: {key: shard_like(self.params[name], value, key) for key, value in per_param.items()}
            for name, per_param in optimizer_state["state"].items()
            if name in self.params
        }
        load_optimizer_state_by_name(self.optimizer, {**optimizer_state, "state": state}, self.names)

    def gather_model(self) -> models.Transformer | None:
        """The whole model on the main rank's CPU, gathered one tensor at a time (no full copy on other ranks)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.sharded, options=options)  # every rank takes part; only rank 0 keeps it
        if not self.process.is_main:
            return None
        model = models.Transformer(self.run.model_cfg, self.run.args.attn_implementation)
        model.load_state_dict(full)
        return model.to(self.process.param_dtype)

    def close(self) -> None:
        if self.batches is not None and self.batches is not self.stream:
            self.batches.close()
        self.barrier()
        dist.destroy_process_group()


def placements_for(param: DTensor, shape: torch.Size, key: str | None) -> list | None:
    """How a tensor of `shape` belonging to `param` is split: None for a plain tensor (0-d step counters).

    Weights and optimizer state shaped like the parameter are split like it; Adafactor's per-row statistics of a
    matrix ("row") follow its row split; anything else (per-column statistics) is replicated.
    """
    if len(shape) == 0:
        return None
    if tuple(shape) == tuple(param.shape):
        return list(param.placements)
    if key == "row" and isinstance(param.placements[0], Shard) and param.placements[0].dim == 0:
        return [Shard(0)]
    return [Replicate()]


def shard_like(param: torch.Tensor, value, key: str | None = None) -> object:
    """`value` (a whole tensor, or a DTensor already read in place) placed as this rank's share of `param`'s."""
    if not torch.is_tensor(value) or isinstance(value, DTensor) or not isinstance(param, DTensor):
        return value
    placements = placements_for(param, value.shape, key)
    if placements is None:
        return value
    mesh = param.device_mesh
    return distribute_tensor(value.to(mesh.device_type), mesh, placements, src_data_rank=None)
