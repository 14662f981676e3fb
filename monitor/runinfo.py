"""What a run is: resolved arguments, plan, model, data, devices, library versions and git commit.

Recorded at start into ``<run dir>/run_info.json`` and into every checkpoint; shown as a table with --verbose-info.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers", "safetensors")


REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=5
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def devices() -> dict:
    if torch.cuda.is_available():
        return {"type": "cuda", "count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
    return {"type": "cpu", "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}


def collect(*, args: dict, plan: dict, model_config, parameters: dict, world_size: int, data: dict) -> dict:
    """The full resolved configuration as one JSON-able dict."""
    cfg = asdict(model_config) if is_dataclass(model_config) else dict(model_config)
    return {
        "args": args,
        "plan": plan,
        "model": cfg | {"parameters": parameters},
        "data": data,
        "world_size": world_size,
        "devices": devices(),
        "versions": versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
    }


def write(run_dir: Path, info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=1, default=str))


def show(info: dict) -> None:
    """Print the configuration as one two-column table per section."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for section, values in info.items():
        if not isinstance(values, dict):
            values = {section: values}
        table = Table(title=section, show_header=False, title_justify="left")
        table.add_column("key", style="cyan")
        table.add_column("value")
        for key, value in values.items():
            table.add_row(str(key), json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
        console.print(table)
