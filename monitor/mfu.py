"""Model FLOPs utilisation (MFU), counted honestly, and peak memory per logging interval.

MFU = achieved model FLOPs per second / the device's dense peak. "Model FLOPs" are the FLOPs the model *needs*
per token (PaLM appendix B convention), not what the kernels happen to execute. That count lives beside the
parameter counts in models/config.py (`matmul_params`, `flops_per_token`; the latter is re-exported here); this
module supplies the attention context it needs (`mean_attended_context`), the device peak and the ratio.
"""

import functools
import re
import resource
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from models.config import flops_per_token as flops_per_token  # re-exported: monitor, meter and bench use it here


def mean_attended_context(doc_ids_or_lengths: torch.Tensor | Sequence[int]) -> float:
    """Mean number of keys a query attends to under a causal, per-document mask.

    Accepts either a batch's ``doc_ids`` tensor ((B, T) or (T,), non-decreasing segment ids starting at 0 in every
    row) or a plain sequence of document lengths. A document of n tokens has queries attending to 1, 2, ..., n keys,
    i.e. n (n + 1) / 2 in total; the result is that total summed over documents divided by the number of tokens.
    """
    if isinstance(doc_ids_or_lengths, torch.Tensor):  # in numpy: a host batch's statistics touch no device
        doc_ids = doc_ids_or_lengths.detach().cpu().numpy().astype(np.int64)
        if doc_ids.ndim == 1:
            doc_ids = doc_ids[None]
        # A segment starts at every row start and wherever the id changes; its length runs to the next start.
        starts = np.ones(doc_ids.shape, dtype=bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        lengths = np.diff(np.append(np.flatnonzero(starts), doc_ids.size)).astype(np.float64)
    else:
        lengths = np.array([float(n) for n in doc_ids_or_lengths], dtype=np.float64)
    if lengths.size == 0 or lengths.sum() <= 0:
        raise ValueError("mean_attended_context needs at least one token; got an empty batch.")
    return float((lengths * (lengths + 1) / 2).sum() / lengths.sum())


# Dense (no 2:4 sparsity) peak FLOP/s per device: (16-bit tensor core, TF32 tensor core, plain FP32).
# First match wins, so more specific names come first. Figures are from the vendors' datasheets and
# whitepapers; GeForce cards are listed at their FP32-accumulate tensor rate, which is what PyTorch uses.
_GPU_PEAKS: list[tuple[str, tuple[float, float, float]]] = [
    (r"GB200|B200", (2250e12, 1100e12, 80e12)),
    (r"H100.*PCIe", (756e12, 378e12, 51e12)),
    (r"H100 NVL", (835e12, 417e12, 60e12)),
    (r"GH200|H100|H200|H800", (989e12, 494e12, 67e12)),
    (r"A100|A800", (312e12, 156e12, 19.5e12)),
    # NOTE: the A10G has no NVIDIA datasheet; 70 TFLOPS is the commonly quoted dense figure (the A10 lists 125).
    (r"A10G", (70e12, 35e12, 31.2e12)),
    (r"\bA10\b", (125e12, 62.5e12, 31.2e12)),
    (r"L40S", (362e12, 183e12, 91.6e12)),
    (r"\bL40\b", (181e12, 90.5e12, 90.5e12)),
    (r"\bL4\b", (121e12, 60e12, 30.3e12)),
    (r"RTX 6000 Ada", (364e12, 182e12, 91.1e12)),
    (r"RTX A6000", (155e12, 77.4e12, 38.7e12)),
    (r"RTX 5090", (209e12, 105e12, 105e12)),
    (r"RTX 4090", (165e12, 82.6e12, 82.6e12)),
    (r"RTX 3090", (71e12, 35.6e12, 35.6e12)),
    # Volta and Turing have fp16 but no bf16 tensor cores; bf16 is looked up separately below.
    (r"V100.*PCIe", (112e12, 14e12, 14e12)),
    (r"V100", (125e12, 15.7e12, 15.7e12)),
    (r"\bT4\b", (65e12, 8.1e12, 8.1e12)),
    (r"MI300X|MI325X", (1307e12, 654e12, 163e12)),
    # ROCm reports each MI250X die (GCD) as its own device: half the package figure.
    (r"MI250X", (191.5e12, 47.9e12, 47.9e12)),
]


def gpu_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Datasheet dense peak for a GPU name as ``torch.cuda.get_device_name`` reports it, or None if unknown."""
    for pattern, (half, tf32_peak, fp32) in _GPU_PEAKS:
        if re.search(pattern, device_name):
            if dtype in (torch.float16, torch.bfloat16):
                if dtype == torch.bfloat16 and re.search(r"V100|\bT4\b", device_name):
                    return fp32  # no bf16 tensor cores: bf16 matmuls run at (at best) FP32 speed
                return half
            return tf32_peak if tf32 else fp32
    return None


@functools.cache
def measured_peak_flops(device_type: str, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Best observed FLOP/s of a square matmul on this device; measured once per (device, dtype) and cached."""
    device = torch.device(device_type)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first call pays for warm-up (thread pools, kernel selection)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s of one device for matmuls in ``dtype``: datasheet value for known GPUs, else measured.

    For float32 on CUDA the TF32 tensor-core peak is used when PyTorch is allowed to use TF32 for matmuls
    (``torch.set_float32_matmul_precision("high")``), the plain FP32 peak otherwise.
    NOTE: on CPUs and unknown GPUs the peak is a measured matmul rate, not a datasheet figure, so MFU there
    reads higher than it would against a theoretical peak.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.get_float32_matmul_precision() != "highest"  # also reflects backends.cuda.matmul.allow_tf32
        peak = gpu_peak_flops(name, dtype, tf32=tf32)
        if peak is not None:
            return peak
    return measured_peak_flops(device.type, dtype)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation as a fraction (0.42 = 42 %).

    Pass throughput and peak for the same set of devices: per-device tokens/s with one device's peak, or the
    global tokens/s with ``peak × world_size``.
    """
    return tokens_per_s * flops_per_token / peak


class PeakMemory:
    """Peak memory of this process per logging interval, in bytes.

    On CUDA it is ``torch.cuda.max_memory_allocated`` (tensors only, not the allocator's cache), reset after every
    read so each interval reports its own peak. NOTE: on CPU it is the process's maximum resident set size from
    ``getrusage``, which the OS cannot reset: it is the peak since the process started, and it includes everything
    (Python, libraries, data), not just tensors.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read_and_reset(self) -> int:
        """Peak bytes since the previous call (CUDA) or since the process started (CPU)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(peak)
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(max_rss if sys.platform == "darwin" else max_rss * 1024)  # bytes on macOS, KiB on Linux
