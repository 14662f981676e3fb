"""Monitoring for training runs: logs, progress, MFU, divergence detection and job control."""

from monitor.divergence import DivergenceDetector
from monitor.jobs import JobControl
from monitor.logs import RunLogger, find_run_dirs, new_run_dir, read_logs

# NOTE: this rebinds `monitor.mfu` to the function; import the module's other names with `from monitor.mfu import`.
from monitor.mfu import PeakMemory, device_peak_flops, flops_per_token, mean_attended_context, mfu
from monitor.progress import Progress

__all__ = [
    "DivergenceDetector",
    "JobControl",
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
