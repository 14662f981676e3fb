"""What observes a run: JSON-lines and TensorBoard logs (and Weights & Biases with --wandb), the progress display, MFU
and memory, text samples and the held-out evaluation, run info, and `python -m monitor` (summary, plot, compare, tb,
control)."""

from monitor.logs import RunLogger, find_run_dirs, new_run_dir, read_logs

# NOTE: this rebinds `monitor.mfu` to the function; import the module's other names with `from monitor.mfu import`.
from monitor.mfu import PeakMemory, device_peak_flops, flops_per_token, mean_attended_context, mfu
from monitor.progress import Progress

__all__ = [
    "PeakMemory",
    "Progress",
    "RunLogger",
    "device_peak_flops",
    "find_run_dirs",
    "flops_per_token",
    "mean_attended_context",
    "mfu",
    "new_run_dir",
    "read_logs",
]
