"""One optimizer step over a model's parameter shapes: Adafactor's four forms against fused AdamW.

Counts the aten operations one Adafactor step dispatches (a TorchDispatchMode; compiled steps by the profiler)
and times, in this process and interleaved, one step of each: Adafactor on bf16 weights with stochastic rounding
(the default job's optimizer) per parameter (a CPU's eager form), stacked by shape (a GPU's eager form), compiled
per parameter in place (a CPU with --compile), compiled stacked (a GPU with --compile), and torch's fused AdamW on
fp32 weights. Gradients are random; the weights are the model's shapes
(models.memory.parameter_shapes), with the optimizer's own grouping.

    python bench/optimizer_step.py                    # deepone-162m on the CPU
    python bench/optimizer_step.py --config llama-30m --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.memory import parameter_shapes  # noqa: E402
from optim import Adafactor  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def parameters(config: str, dtype: torch.dtype, device: str) -> list[nn.Parameter]:
    cfg = models.load_model_config(config, vocab_size=32768)
    g = torch.Generator().manual_seed(0)
    params = []
    for shape in parameter_shapes(cfg).values():
        p = nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def timed(optimizer: torch.optim.Optimizer, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def profiled_ops(optimizer: torch.optim.Optimizer) -> int:
    """Top-level aten operations of one step, counted by the profiler (a dispatch mode would change what
    TorchDynamo runs)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer.step()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="deepone-162m", help="named model config (default deepone-162m)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed steps of each optimizer, interleaved")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()

    bf16 = parameters(args.config, torch.bfloat16, args.device)
    eager, compiled = Adafactor(bf16, 1e-3, compiled=False), None
    fp32 = parameters(args.config, torch.float32, args.device)
    adamw = torch.optim.AdamW(fp32, lr=1e-3, fused=True)
    eager.step()  # the first step creates the state; count a later one
    with CountOps() as counter:
        eager.step()
    bf16_compiled = parameters(args.config, torch.bfloat16, args.device)
    compiled = Adafactor(bf16_compiled, 1e-3, compiled=True)
    start = time.perf_counter()
    compiled.step()
    compile_s = time.perf_counter() - start
    adamw.step()
    bf16_stacked = parameters(args.config, torch.bfloat16, args.device)
    stacked_compiled = Adafactor(bf16_stacked, 1e-3, grouped=True, compiled=True)
    stacked_compiled.step()
    stacked = Adafactor(parameters(args.config, torch.bfloat16, args.device), 1e-3, grouped=True)
    stacked.step()
    with CountOps() as stacked_counter:
        stacked.step()
    forms = {
        "adafactor_eager": eager,
        "adafactor_grouped_eager": stacked,
        "adafactor_compiled": compiled,
        "adafactor_grouped_compiled": stacked_compiled,
    }
    times = {k: [] for k in [*forms, "adamw_fused_fp32"]}
    for _ in range(args.repeats):
        for name, optimizer in forms.items():
            times[name].append(timed(optimizer, args.device))
        times["adamw_fused_fp32"].append(timed(adamw, args.device))
    median = {k: statistics.median(v) for k, v in times.items()}
    # what a compiled step still dispatches (stacking, copies back, keys, the graphs' buffers)
    compiled_ops = {name: profiled_ops(optimizer) for name, optimizer in forms.items() if "compiled" in name}
    result = {
        "config": args.config,
        "device": args.device,
        "parameters": len(bf16),
        "groups": len({(tuple(p.shape), p.dtype) for p in bf16}),
        "adafactor_aten_ops_per_step": {
            "eager": counter.count,
            "grouped_eager": stacked_counter.count,
            "compiled": compiled_ops["adafactor_compiled"],
            "grouped_compiled": compiled_ops["adafactor_grouped_compiled"],
        },
        "compile_s": round(compile_s, 1),
        "seconds": {k: round(v, 4) for k, v in median.items()},
        "ratio_to_fused_adamw": {
            k: round(v / median["adamw_fused_fp32"], 2) for k, v in median.items() if k != "adamw_fused_fp32"
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.config} on {args.device}: {result['parameters']} parameters in {result['groups']} groups")
    ops = result["adafactor_aten_ops_per_step"]
    print(f"aten ops per Adafactor step: {', '.join(f'{k} {v:,}' for k, v in ops.items())}")
    for k, v in median.items():
        ratio = result["ratio_to_fused_adamw"].get(k)
        print(f"  {k:<26} {v:8.3f} s" + (f"  {ratio:.2f}x fused AdamW" if ratio is not None else ""))
    print(f"compiling Adafactor's groups took {compile_s:.1f} s (first step)")


if __name__ == "__main__":
    main()
