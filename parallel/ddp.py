"""Data parallel through Accelerate: one process and DDP (one node or several); FSDP is parallel/fsdp.py."""

from __future__ import annotations

import math

import torch

import data
import models
from lifecycle.staging import build_tokenizer
from monitor import samples
from monitor.meter import Meter
from optim import load_optimizer_state_by_name, optimizer_state_by_name
from optim.clipping import clip_, global_norm

from .build import build_model, build_optimizer, data_streams, label_count, start_batches, to_device
from .layout import Run, precision, start_process


class DataParallel:
    """One process or DDP through Accelerate: every rank trains on its rows of the global batch."""

    place = None  # checkpoints are read whole (see lifecycle.checkpoint.load_checkpoint)

    def __init__(self, run: Run):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        args, self.run = run.args, run
        cpu = not torch.cuda.is_available()
        dtype, pure_bf16 = precision(args, "cpu" if cpu else "cuda")
        backend = InitProcessGroupKwargs(backend=args.dist_backend or ("gloo" if cpu else "nccl"))
        self.accelerator = acc = Accelerator(
            cpu=cpu,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision="bf16" if dtype == torch.bfloat16 and not pure_bf16 else "no",
            kwargs_handlers=[backend] if run.world_size > 1 else [],
        )
        self.process = start_process(args, rank=acc.process_index, world=acc.num_processes, device=acc.device)
        self.tokenizer = build_tokenizer(run, self.process.is_main, self.barrier)
        self.raw_model = build_model(run, self.process.param_dtype).to(self.process.device)
        self.names = {p: name for name, p in self.raw_model.named_parameters()}
        optimizer = build_optimizer(run, self.raw_model)
        if args.compile:  # the loss path, in place: names, checkpoints and text samples stay as without it
            self.raw_model.compile_loss_path()
        self.model, self.optimizer = acc.prepare(self.raw_model, optimizer)
        self.stream, self.eval_set = data_streams(
            run, self.tokenizer, args.batch_size, self.process.rank, self.process.world
        )
        self.byte_lengths = torch.as_tensor(data.token_byte_lengths(self.tokenizer))  # bits per byte at each eval
        self.batches = None

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.process.world > 1 else t

    def start_data(self, data_state: dict | None):
        self.batches = start_batches(self.stream, data_state, pin=self.process.device.type == "cuda")
        return self.batches

    def train_step(self, meter: Meter) -> tuple[torch.Tensor, torch.Tensor]:
        accum = self.run.args.gradient_accumulation_steps
        batches = [next(self.batches) for _ in range(accum)]
        # NOTE: normalise by the label count of the whole global batch, not per micro-batch and rank, so the loss and
        # gradients equal one process's over the same rows (accumulate() divides by the micro-steps and DDP averages
        # over ranks, hence the factor).
        labels = self.reduce_sum(torch.tensor(label_count(batches), device=self.process.device))
        num_items = labels / (self.process.world * accum)
        step_loss, max_norm = torch.zeros((), device=self.process.device), self.run.args.max_grad_norm or math.inf
        for batch in batches:
            meter.add_micro_batch(batch["doc_ids"])
            batch = to_device(batch, self.process.device, self.run.args.attn_implementation == "varlen")
            with self.accelerator.accumulate(self.model):
                loss = self.model(**batch, num_items=num_items)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:  # max_norm inf measures the norm without clipping
                    grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
                    grad_norm = global_norm(grads)  # the replicas hold the same reduced gradients
                    clip_(grads, max_norm, grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accum
        return self.reduce_sum(step_loss) / self.process.world, grad_norm  # on the device: read when logged

    def evaluate(self) -> dict:
        return samples.evaluate(self.model, self.eval_set, self.process.device, self.byte_lengths, self.reduce_sum)

    def checkpoint_parts(self) -> tuple[dict | None, dict | None]:
        if not self.process.is_main:  # the replicas are equal: the main rank writes them
            return None, None
        return self.raw_model.state_dict(), optimizer_state_by_name(self.optimizer, self.names)

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        self.raw_model.load_state_dict(model_state)
        load_optimizer_state_by_name(self.optimizer, optimizer_state, self.names)

    def gather_model(self) -> models.Transformer | None:
        return self.raw_model if self.process.is_main else None

    def sample_model(self) -> models.Transformer | None:
        return self.gather_model()  # the main rank samples alone

    def close(self) -> None:
        if self.batches is not None and self.batches is not self.stream:
            self.batches.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
