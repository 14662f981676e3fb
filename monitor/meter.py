"""Per-interval training statistics: mean loss, tokens/s, MFU over the measured attention context, peak memory."""

from __future__ import annotations

import time

import torch

from monitor.mfu import PeakMemory, flops_per_token, mean_attended_context, mfu


class Meter:
    """Accumulate what happens between two log records; ``record()`` returns the fields and starts a new interval.

    ``add_step`` takes the step's global loss (the same on every rank), so a record needs no communication.
    On a CPU the peak is measured (monitor.mfu), so MFU never reads above 100%: a faster interval raises the peak.
    """

    def __init__(self, model_cfg, tokens_per_step: int, world_size: int, peak_flops: float, device: torch.device):
        self.model_cfg, self.tokens_per_step, self.world_size = model_cfg, tokens_per_step, world_size
        self.peak_flops, self.device = peak_flops, device
        self.peak_memory = PeakMemory(device)
        self._reset()

    def _reset(self) -> None:
        self.loss = 0.0
        self.steps, self.micro_batches, self.context = 0, 0, 0.0
        self.start = time.perf_counter()

    def add_micro_batch(self, doc_ids: torch.Tensor) -> None:
        """Call with each micro-batch's CPU doc_ids (avoids a device sync)."""
        self.context += mean_attended_context(doc_ids)
        self.micro_batches += 1

    def add_step(self, loss) -> None:
        """The step's global loss: a number, or a device tensor (summed there; read only by `record`)."""
        self.loss = self.loss + loss
        self.steps += 1

    def record(self) -> dict:
        """loss (mean over steps), tokens_per_s (all ranks), mfu (per device), peak_mem_bytes."""
        tokens_per_s = self.steps * self.tokens_per_step / (time.perf_counter() - self.start)
        context = self.context / max(self.micro_batches, 1)
        per_token = flops_per_token(self.model_cfg, context)
        if self.device.type == "cpu":  # a measured peak is a lower bound: training running faster proves more
            self.peak_flops = max(self.peak_flops, tokens_per_s / self.world_size * per_token)
        fields = {
            "loss": float(self.loss) / max(self.steps, 1),  # the losses stayed on the device until now
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s / self.world_size, per_token, self.peak_flops),
            "peak_mem_bytes": self.peak_memory.read_and_reset(),
        }
        self._reset()
        return fields
