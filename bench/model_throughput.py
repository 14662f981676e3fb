"""Training-step throughput of our Transformer vs transformers' LlamaForCausalLM, same shapes, weights and kernels.

One step = forward + backward + AdamW step on a packed batch (several documents per row, document-masked attention
on both sides: transformers reads the boundaries from the restarting position_ids). The two models run interleaved
in one process so that machine noise hits both alike; the table reports the median step time.

    python bench/model_throughput.py                       # CPU: fp32, sdpa, llama-30m shape, 2 x 256 tokens
    python bench/model_throughput.py --device cuda         # GPU: bf16, flex_attention, 8 x 2048 tokens
    python bench/model_throughput.py --device cuda --compile --json

MFU = (6 * matmul params * tokens + attention FLOPs) / device peak (monitor/mfu.py; on CPU the peak is a measured
matmul rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import Transformer, compiled_graphs, load_model_config, varlen_offsets  # noqa: E402
from models.hf import hf_config, to_hf_state_dict  # noqa: E402
from monitor.mfu import device_peak_flops, flops_per_token, mean_attended_context  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="llama-30m", help="named llama-family config or .json path (default llama-30m)")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--num-layers", type=int, default=None, help="override num_hidden_layers (default: the config's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument(
        "--attn-implementation",
        default=None,
        choices=["eager", "sdpa", "flex_attention", "varlen"],
        help="default: sdpa on CPU, flex_attention on CUDA (used by both models)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default 2 on CPU, 8 on CUDA)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 256 on CPU, 2048 on CUDA)")
    p.add_argument("--docs-per-row", type=int, default=3, help="documents packed into each row (default 3)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per model (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default 2)")
    p.add_argument("--compile", action="store_true", help="compile both models (transformers' whole)")
    p.add_argument(
        "--compile-ours",
        default="loss-path",
        choices=["loss-path", "blocks"],
        help="with --compile: ours' loss path whole as train.py does (default), or each decoder block alone",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def packed_batch(batch: int, seq_len: int, docs: int, vocab: int, device, seed: int) -> dict:
    """Rows of `docs` documents of random lengths, in the data contract (shifted labels, positions, doc ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    doc_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    position_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        cuts = sorted(torch.randperm(seq_len - 1, generator=g)[: docs - 1].add(1).tolist())
        for d, (start, end) in enumerate(zip([0, *cuts], [*cuts, seq_len], strict=True)):
            doc_ids[row, start:end] = d
            position_ids[row, start:end] = torch.arange(end - start)
    next_doc = torch.cat([doc_ids[:, 1:], doc_ids[:, -1:]], dim=1)
    labels = torch.where(next_doc == doc_ids, ids[:, 1:], -100)
    out = {"input_ids": ids[:, :-1], "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}
    return {k: v.to(device) for k, v in out.items()}


def build_models(cfg, attn: str, device, dtype, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    ours = Transformer(cfg, attn)
    ours.init_weights()
    # transformers has no varlen backend of that name: against varlen it runs sdpa (causal over the whole row)
    theirs_attn = "sdpa" if attn == "varlen" else attn
    theirs = LlamaForCausalLM._from_config(hf_config(cfg), attn_implementation=theirs_attn)
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()
    ours, theirs = ours.to(device, dtype).train(), theirs.to(device, dtype).train()
    return ours, theirs


def step_fns(ours, theirs, batch: dict, vocab: int, compile_models: bool, compile_ours: str = "loss-path"):
    """One training step per model: loss, backward, AdamW (the same optimizer settings for both)."""
    fused = {"fused": True}
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, **fused)
    # Each at its best compiled setting: ours compiles its loss path whole (what train.py --compile does; the mask is
    # built before the graph), transformers' model is compiled whole.
    fwd_ours, fwd_theirs = ours, theirs
    if compile_models:
        if compile_ours == "loss-path":
            ours.compile_loss_path()
        else:  # the alternative train.py does not use, for comparison: one graph per block, head and loss eager
            for i, block in enumerate(ours.layers):
                ours.layers[i] = torch.compile(block, dynamic=False, fullgraph=True)
        fwd_theirs = torch.compile(theirs)

    def ours_step():
        loss = fwd_ours(
            batch["input_ids"],
            batch["position_ids"],
            batch["doc_ids"],
            labels=batch["labels"],
            cu_seqlens=batch.get("cu_seqlens"),
        )
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def theirs_step():
        # transformers' standard causal-LM loss: full logits upcast to fp32, then cross-entropy
        logits = fwd_theirs(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, vocab), batch["labels"].view(-1), ignore_index=-100)
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss

    return ours_step, theirs_step


def timed(fn, device) -> tuple[float, int]:
    """Seconds for one call, and the peak bytes of CUDA memory it allocated (0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated()
    return time.perf_counter() - start, 0


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    attn = args.attn_implementation or ("flex_attention" if cuda else "sdpa")
    batch_size, seq_len = args.batch_size or (8 if cuda else 2), args.seq_len or (2048 if cuda else 256)

    cfg = load_model_config(args.config, vocab_size=args.vocab_size)
    if cfg.family != "llama":
        raise SystemExit(f"--config must be a llama-family config (got family {cfg.family!r})")
    if args.num_layers:
        cfg.num_hidden_layers = args.num_layers
    if attn == "flex_attention" and device.type == "cpu":
        raise SystemExit("flex_attention has no backward on CPU; use sdpa or eager there")
    ours, theirs = build_models(cfg, attn, device, dtype, args.seed)
    batch = packed_batch(batch_size, seq_len, args.docs_per_row, cfg.vocab_size, device, args.seed)
    if attn == "varlen":  # the document offsets the data path builds on the host for this backend
        batch["cu_seqlens"] = varlen_offsets(batch["doc_ids"].cpu(), batch_size, seq_len).to(device)
    ours_step, theirs_step = step_fns(ours, theirs, batch, cfg.vocab_size, args.compile, args.compile_ours)

    with torch.no_grad():  # same weights, same batch: the initial losses must agree
        hf_logits = theirs(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        first = {
            "ours": ours(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"]).item(),
            "transformers": F.cross_entropy(
                hf_logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
            ).item(),
        }
        del hf_logits
    compile_s = {"ours": 0.0, "transformers": 0.0}
    for _ in range(args.warmup):  # the first warm-up step of each model compiles it under --compile
        for name, step in (("ours", ours_step), ("transformers", theirs_step)):
            compile_s[name] += timed(step, device)[0]
    graphs_after_warmup = compiled_graphs()
    times, peaks = {"ours": [], "transformers": []}, {"ours": 0, "transformers": 0}
    for _ in range(args.steps):  # interleaved so that load spikes hit both
        for name, step in (("ours", ours_step), ("transformers", theirs_step)):
            seconds, peak_bytes = timed(step, device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak_bytes)

    tokens = batch_size * seq_len
    fpt = flops_per_token(cfg, mean_attended_context(batch["doc_ids"]))
    peak = device_peak_flops(device, dtype)
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rows[name] = {
            "step_s": median,
            "tokens_per_s": tokens / median,
            "mfu": tokens / median * fpt / peak,
            "peak_mem_gib": peaks[name] / 2**30,
        }
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn,
        "compile": args.compile and f"ours {args.compile_ours}, transformers whole",
        "config": args.config,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "docs_per_row": args.docs_per_row,
        "steps": args.steps,
        "initial_loss": first,
        "peak_flops": peak,
        **rows,
        "ratio_ours_over_transformers": rows["ours"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"],
        "warmup_s": compile_s,
        "graphs_compiled": graphs_after_warmup,
        "recompiles_while_timed": compiled_graphs() - graphs_after_warmup,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['device']}, {result['dtype']}, {attn}, compile={result['compile'] or False}, {args.config} "
            f"({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}), {batch_size} x {seq_len} tokens, "
            f"{args.docs_per_row} docs/row, median of {args.steps} steps"
        )
        print(f"initial loss: ours {first['ours']:.5f}, transformers {first['transformers']:.5f}")
        print(f"{'model':<14}{'step (s)':>10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
        for name in ("ours", "transformers"):
            r = rows[name]
            mem = f"{r['peak_mem_gib']:>10.2f}" if cuda else f"{'n/a':>10}"
            print(f"{name:<14}{r['step_s']:>10.3f}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}{mem}")
        print(f"ratio ours / transformers: {result['ratio_ours_over_transformers']:.2f}x")
        if args.compile:
            print(
                f"warm-up ({args.warmup} steps, compiling): ours {compile_s['ours']:.1f}s, transformers "
                f"{compile_s['transformers']:.1f}s; {graphs_after_warmup} graphs, "
                f"{result['recompiles_while_timed']} recompiles while timed"
            )
    return result


if __name__ == "__main__":
    main()
