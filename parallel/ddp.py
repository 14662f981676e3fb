"""Data parallel through Accelerate: one process and DDP (one node or several); FSDP is parallel/fsdp.py."""

from __future__ import annotations

import math

import torch

import data
import models
from monitor import samples
from monitor.meter import Meter
from schedule.optim import load_optimizer_state_by_name, optimizer_state_by_name

from .common import Run, build_model, build_optimizer, build_tokenizer, data_streams, label_count, precision


class DataParallel:
    """One process or DDP through Accelerate: every rank trains on its rows of the global batch."""

    place = None  # checkpoints are read whole (see monitor.checkpoint.load_checkpoint)

    def __init__(self, run: Run):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        args, self.run = run.args, run
        cpu = not torch.cuda.is_available()
        self.dtype, pure_bf16 = precision(args, "cpu" if cpu else "cuda")
        backend = InitProcessGroupKwargs(backend=args.dist_backend or ("gloo" if cpu else "nccl"))
        self.accelerator = acc = Accelerator(
            cpu=cpu,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision="bf16" if self.dtype == torch.bfloat16 and not pure_bf16 else "no",
            kwargs_handlers=[backend] if run.world_size > 1 else [],
        )
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        self.is_main, self.can_checkpoint = acc.is_main_process, True
        if not cpu:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.tokenizer = build_tokenizer(run, self.is_main, self.barrier)
        self.raw_model = build_model(run, torch.bfloat16 if pure_bf16 else torch.float32).to(self.device)
        self.names = {p: name for name, p in self.raw_model.named_parameters()}
        optimizer = build_optimizer(run, self.raw_model)
        if args.compile:  # the loss path, in place: names, checkpoints and text samples stay as without it
            self.raw_model.compile_loss_path()
        self.model, self.optimizer = acc.prepare(self.raw_model, optimizer)
        self.stream, self.eval_set = data_streams(run, self.tokenizer, args.batch_size, self.rank, self.world)
        self.byte_lengths = torch.as_tensor(data.token_byte_lengths(self.tokenizer))  # bits per byte at each eval
        self.batches = None

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.world > 1 else t

    def start_data(self):
        # Batches are prepared on a thread while the model trains (a dispatched stream must stay on this thread).
        self.batches = self.stream if self.stream.dispatch else data.Prefetcher(self.stream)
        return self.batches

    def train_step(self, meter: Meter) -> tuple[float, float]:
        accum = self.run.args.gradient_accumulation_steps
        batches = [next(self.batches) for _ in range(accum)]
        # NOTE: normalise by the label count of the whole global batch, not per micro-batch and rank, so the loss and
        # gradients equal one process's over the same rows (accumulate() divides by the micro-steps and DDP averages
        # over ranks, hence the factor).
        labels = self.reduce_sum(torch.tensor(label_count(batches), device=self.device))
        num_items = labels / (self.world * accum)
        step_loss, max_norm = torch.zeros((), device=self.device), self.run.args.max_grad_norm or math.inf
        for batch in batches:
            meter.add_micro_batch(batch["doc_ids"])
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.accelerator.accumulate(self.model):
                loss = self.model(**batch, num_items=num_items)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:  # max_norm inf measures the norm without clipping
                    grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accum
        return float(self.reduce_sum(step_loss)) / self.world, float(grad_norm)

    def evaluate(self) -> dict:
        return samples.evaluate(self.model, self.eval_set, self.device, self.byte_lengths, self.reduce_sum)

    def model_part(self) -> dict | None:
        return self.raw_model.state_dict() if self.is_main else None

    def optimizer_part(self) -> dict | None:
        return optimizer_state_by_name(self.optimizer, self.names) if self.is_main else None

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        self.raw_model.load_state_dict(model_state)
        load_optimizer_state_by_name(self.optimizer, optimizer_state, self.names)

    def gather_model(self) -> models.Transformer | None:
        return self.raw_model if self.is_main else None

    def sample_model(self) -> models.Transformer | None:
        return self.gather_model()  # the main rank samples alone

    def close(self) -> None:
        if self.batches is not None and self.batches is not self.stream:
            self.batches.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
