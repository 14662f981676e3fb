"""Pretrain a small language model on a token budget.

One process (CPU or one GPU):
    python train.py --total-tokens 3
Data parallel through Accelerate (single node, multi-node, FSDP):
    accelerate launch --config_file accelerate_configs/4gpu.yaml train.py --total-tokens 3
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml train.py --model tiny --dataset builtin ...
Pipeline parallel through DeepSpeed's PipelineModule:
    deepspeed train.py --pipeline --pipeline-schedule 1F1B
See the plan without running anything:
    python train.py --dry-run --world-size 4 [--json]

Reading order: arguments -> main() resolves the plan -> train_ddp() or train_pipeline(), which share the model,
data, schedule, logging and checkpoint helpers from models/, data/, schedule/ and monitor/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import models
import schedule
from monitor import checkpoint as ckpt
from monitor import runinfo

DEFAULT_MODEL = "deepone-162m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("token budget and batch")
    g.add_argument("--init-model", action="store_true", help="start a new model instead of resuming the newest checkpoint")
    g.add_argument("--total-tokens", type=float, default=3.0, help="training budget in billions of tokens")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides the budget)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per device per micro-step")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--max-length", type=int, default=4096, help="tokens per packed sequence")
    g = p.add_argument_group("learning rate")
    g.add_argument("--learning-rate", type=float, default=1.4e-5, help="peak LR for global batch 1 (scaled by sqrt)")
    g.add_argument("--warmup-steps", type=int, default=500, help="linear warmup from 0 to the peak LR, in steps")
    g.add_argument("--min-cooldown-tokens", type=float, default=100.0, help="minimum cosine cooldown, billions of tokens")
    g.add_argument("--anneal-steps", type=int, default=0, help="anneal to min_lr over the last N steps (0 = never)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="named config in models/configs/ (e.g. tiny, llama-124m)")
    g.add_argument("--model-config", default=None, help="path to a model config JSON (overrides --model)")
    g.add_argument("--init-from", default=None, help="start from a Hugging Face model folder (continued pretraining)")
    g.add_argument("--attn-implementation", default="sdpa",
                   choices=["eager", "sdpa", "flex_attention", "flash_attention_2"], help="attention kernel")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="smollm", help="smollm (Hub mix), builtin (offline), paths, or a mix; see README")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json, folder or Hub name (default: train one on the data)")
    g.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size when a tokenizer is trained")
    g.add_argument("--tokenizer-docs", type=int, default=200_000, help="documents used to train a tokenizer")
    g.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    g.add_argument("--no-restore-dataset-state", action="store_true", help="on resume, restart the data from the start")
    g.add_argument("--dispatch-batches", action="store_true", help="rank 0 reads the data and sends each rank its rows")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"], help="update rule")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay")
    g.add_argument("--max-grad-norm", type=float, default=4.0, help="gradient clipping threshold (0 = off)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output-dir", default=None, help="run directory (default: output_models/<model name>)")
    g.add_argument("--overwrite-output-dir", action="store_true", help="with --init-model, delete earlier checkpoints")
    g.add_argument("--save-strategy", default="steps", choices=["no", "steps", "epoch"], help="when to checkpoint")
    g.add_argument("--save-total-limit", type=int, default=4, help="checkpoints kept (the best 2 by eval loss always)")
    g.add_argument("--step-cadence", type=float, default=1.0, help="scale the log/eval/save intervals")
    g.add_argument("--sample-tokens", type=int, default=48, help="tokens generated per text sample at eval (0 = none)")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order and sampling")
    g = p.add_argument_group("distributed")
    g.add_argument("--dist-backend", default=None, help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    g.add_argument("--pipeline", action="store_true", help="pipeline parallel with DeepSpeed (launch with deepspeed)")
    g.add_argument("--pipeline-schedule", default="1F1B", help="1F1B (default) or GPipe")
    g.add_argument("--microbatch-scale", type=int, default=1, help="multiply the number of pipeline microbatches")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    g = p.add_argument_group("debugging")
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    g.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object")
    g.add_argument("--world-size", type=int, default=None, help="with --dry-run: plan for N processes")
    g.add_argument("--verbose-info", action="store_true", help="print the full resolved configuration at start")
    return p.parse_args(argv)


class UsageError(ValueError):
    """Bad input: reported in one line with exit code 2."""


@dataclass
class Run:
    """Everything main() resolves before training: what both training paths need."""

    args: argparse.Namespace
    plan: schedule.Plan
    model_cfg: models.ModelConfig
    output_dir: Path
    resume_from: Path | None
    world_size: int
    rank: int
    extra: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# Resolve and validate everything cheap before any expensive work


def validate_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "gradient_accumulation_steps", "max_length", "microbatch_scale", "eval_batches"):
        if getattr(args, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be a positive integer, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UsageError(f"--max-steps must be positive, got {args.max_steps}; omit it to train to the token budget")
    if args.total_tokens <= 0:
        raise UsageError(f"--total-tokens must be positive (billions of tokens), got {args.total_tokens}")
    if args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        raise UsageError(f"--learning-rate must be a positive number, got {args.learning_rate}")
    if args.step_cadence <= 0:
        raise UsageError(f"--step-cadence must be positive, got {args.step_cadence}")
    if args.json and not args.dry_run:
        raise UsageError("--json only applies to --dry-run")
    if args.world_size is not None and not args.dry_run:
        raise UsageError("--world-size only applies to --dry-run; launchers set the real world size")
    if args.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise UsageError(f"--pipeline-schedule {args.pipeline_schedule} is not available with DeepSpeed's pipeline "
                         f"engine; use one of {', '.join(sorted(set(PIPELINE_SCHEDULES.values())))}")


PIPELINE_SCHEDULES = {"1F1B": "1F1B", "Schedule1F1B": "1F1B", "GPipe": "GPipe", "ScheduleGPipe": "GPipe"}


def resolve_run(args: argparse.Namespace) -> Run:
    validate_args(args)
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model_name = args.model_config or args.model
    output_dir = Path(args.output_dir or Path("output_models") / Path(model_name).stem)
    checkpoints = output_dir / "checkpoints"
    resume_from = None
    if not args.init_model and not args.dry_run:
        resume_from = ckpt.latest_checkpoint(checkpoints, warn=lambda m: rank == 0 and print(m, file=sys.stderr))
    if args.init_model and ckpt.checkpoint_dirs(checkpoints) and not args.overwrite_output_dir and not args.dry_run:
        raise UsageError(f"{output_dir} already holds checkpoints; drop --init-model to resume them, choose another "
                         "--output-dir, or add --overwrite-output-dir to delete them")

    vocab_size = None
    if args.tokenizer:
        vocab_size = data.load_tokenizer(args.tokenizer).get_vocab_size()
    elif (output_dir / "tokenizer").is_dir() and not args.init_model:
        vocab_size = data.load_tokenizer(output_dir / "tokenizer").get_vocab_size()
    elif args.init_from is None:
        vocab_size = args.vocab_size
    model_cfg = (models.load_hf_config(args.init_from) if args.init_from
                 else models.load_model_config(model_name, vocab_size=vocab_size))
    if args.max_length > model_cfg.max_position_embeddings:
        raise UsageError(f"--max-length {args.max_length} is longer than the model supports "
                         f"({model_cfg.max_position_embeddings}); lower --max-length or raise max_position_embeddings")
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        if saved["model_config"] != models.config_to_dict(model_cfg):
            raise UsageError(f"{output_dir} holds a different model ({saved['model_name']}); use another --output-dir, "
                             "or --init-model --overwrite-output-dir to replace it")

    dp_size = world_size
    if args.pipeline:
        dp_size = 1  # every rank is a pipeline stage; see train_pipeline for the microbatch split
        n_micro = world_size * args.microbatch_scale
        if args.batch_size % n_micro:
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by stages × microbatch scale = "
                             f"{world_size} × {args.microbatch_scale} = {n_micro}; change --batch-size or --microbatch-scale")
    try:
        plan = schedule.make_plan(
            total_tokens=args.total_tokens, batch_size=args.batch_size, grad_accum=args.gradient_accumulation_steps,
            world_size=dp_size, max_length=args.max_length, base_lr=args.learning_rate, warmup_steps=args.warmup_steps,
            min_cooldown_tokens=args.min_cooldown_tokens, step_cadence=args.step_cadence, max_steps=args.max_steps,
            anneal_steps=args.anneal_steps)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.dry_run:
        mix = data.parse_mix(args.dataset)  # raises ValueError for a missing path or an unknown name
        if args.init_from and not Path(args.init_from).is_dir():
            raise UsageError(f"--init-from {args.init_from} is not a folder; point it at a Hugging Face model folder")
    run = Run(args, plan, model_cfg, output_dir, resume_from, world_size, rank)
    run.extra["mix"] = None if args.dry_run else mix
    return run


def print_plan(run: Run) -> None:
    counts = models.count_parameters(run.model_cfg)
    plan = run.plan.to_dict() | {"parameters": counts, "model": run.args.model_config or run.args.model,
                                 "world_size": run.world_size, "pipeline": run.args.pipeline}
    if run.args.json:
        print(json.dumps(plan))
    else:
        print(schedule.format_plan(run.plan))
        print(f"model {plan['model']}: {counts['total'] / 1e6:.1f}M parameters "
              f"({counts['non_embedding'] / 1e6:.1f}M without embeddings); world size {run.world_size}")


# -----------------------------------------------------------------------------
# Pieces shared by both training paths


def build_tokenizer(run: Run, is_main: bool, wait: callable):
    """Load --tokenizer, reuse the run's own, or train one from the data (main rank trains, others wait)."""
    if is_main:
        tok = data.resolve_tokenizer(run.args.tokenizer, run.extra["mix"], run.output_dir,
                                     vocab_size=run.args.vocab_size, max_docs=run.args.tokenizer_docs)
    wait()
    if not is_main:
        tok = data.resolve_tokenizer(run.args.tokenizer, run.extra["mix"], run.output_dir,
                                     vocab_size=run.args.vocab_size, max_docs=run.args.tokenizer_docs)
    return tok


def build_model(run: Run, device: torch.device, dtype: torch.dtype) -> models.Transformer:
    torch.manual_seed(run.args.seed)
    if run.args.init_from:
        model, _ = models.load_hf(run.args.init_from)
    else:
        model = models.Transformer(run.model_cfg, attn_implementation=run.args.attn_implementation)
        model.init_weights()
    model.set_attn_implementation(run.args.attn_implementation)
    return model.to(device=device, dtype=dtype)


def trainer_state(run: Run, step: int, tokens: int, stream, eval_loss: float | None, extra: dict) -> dict:
    return {
        "step": step, "tokens": tokens, "eval_loss": eval_loss, "world_size": run.world_size,
        "model_name": run.args.model_config or run.args.model, "model_config": models.config_to_dict(run.model_cfg),
        "plan": run.plan.to_dict(), "args": vars(run.args), "data_state": stream.state_dict(),
        "run_info": run.extra.get("info", {}), **extra,
    }


@torch.no_grad()
def evaluate(model, batches: list[dict], device, reduce_sum) -> float:
    """Token-weighted mean loss over this rank's share of the fixed held-out batches, summed across ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = (batch["labels"] != -100).sum()
        total += torch.stack([model(**batch).double() * n, n.double()])
    total = reduce_sum(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


class StopSignals:
    """SIGTERM/SIGINT ask for a clean stop: save a checkpoint at the next step boundary, then exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True


# -----------------------------------------------------------------------------
# Data parallel training with Accelerate


def train_ddp(run: Run) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    args, plan = run.args, run.plan
    cpu = not torch.cuda.is_available()
    device_hint = torch.device("cpu" if cpu else "cuda")
    dtype = schedule.resolve_dtype(args.dtype, device_hint)
    pure_bf16 = dtype == torch.bfloat16 and args.optimizer == "adafactor"
    backend = args.dist_backend or ("gloo" if cpu else "nccl")
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if dtype == torch.bfloat16 and not pure_bf16 else "no",
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend)],
    )
    device, is_main = accelerator.device, accelerator.is_main_process
    say = accelerator.print
    if accelerator.num_processes != run.world_size:
        run.world_size = accelerator.num_processes
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.init_model and args.overwrite_output_dir and is_main:
        ckpt.remove_checkpoints(run.output_dir / "checkpoints")
    tokenizer = build_tokenizer(run, is_main, accelerator.wait_for_everyone)
    model = build_model(run, device, torch.bfloat16 if pure_bf16 else torch.float32)
    optimizer = schedule.build_optimizer(args.optimizer, model, plan.max_lr, weight_decay=args.weight_decay,
                                         seed=args.seed)
    scheduler = schedule.InfiniteLR(optimizer, plan)
    stream = data.PackedStream(run.extra["mix"], tokenizer, args.max_length, args.batch_size,
                               rank=accelerator.process_index, world_size=accelerator.num_processes, seed=args.seed,
                               dispatch=args.dispatch_batches)
    eval_set = data.eval_batches(run.extra["mix"], tokenizer, args.max_length, args.batch_size,
                                 args.eval_batches, seed=args.seed)[accelerator.process_index::accelerator.num_processes]

    step, tokens, best_eval, run_dir = 0, 0, None, None
    if run.resume_from is not None:
        state = ckpt.load_checkpoint(run.resume_from, accelerator.process_index)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        ts = state["trainer_state"]
        step, tokens, run_dir = ts["step"], ts["tokens"], ts.get("run_dir")
        scheduler.load_state_dict({"step": step})
        if args.no_restore_dataset_state:
            say("data: --no-restore-dataset-state given, restarting the data from the beginning")
        else:
            stream.load_state_dict(ts["data_state"])  # raises ValueError when the data mix changed
        if state["rank_state"] is not None and ts["world_size"] == accelerator.num_processes:
            ckpt.restore_rng(state["rank_state"]["rng"])
        say(f"resumed from {run.resume_from} at step {step:,} ({tokens:,} tokens)")
    if args.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    from monitor import JobControl, Progress, RunLogger, flops_per_token, mfu, PeakMemory, device_peak_flops

    run_dir = Path(run_dir) if run_dir else run.output_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    logger = RunLogger(run_dir, enabled=is_main, resume_step=step if run.resume_from else None)
    run.extra["info"] = runinfo.collect(run, accelerator, tokenizer)
    if is_main:
        runinfo.write(run_dir, run.extra["info"])
        if args.verbose_info:
            runinfo.show(run.extra["info"])
        say(schedule.format_plan(plan))
    progress = Progress(plan.total_steps, plan.total_steps * plan.tokens_per_step, enabled=is_main, start_step=step)
    peak = device_peak_flops(device, dtype)
    peak_mem = PeakMemory(device)
    control = JobControl(run.output_dir, run.output_dir.name) if is_main else None
    stop_signals = StopSignals()

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t

    def save(eval_loss: float | None) -> None:
        path = ckpt.save_checkpoint(
            run.output_dir / "checkpoints", step, rank=accelerator.process_index, barrier=accelerator.wait_for_everyone,
            model_state=raw_model.state_dict() if is_main else None,
            optimizer_state=optimizer.state_dict() if is_main else None,
            trainer_state=trainer_state(run, step, tokens, stream, eval_loss, {"run_dir": str(run_dir)}),
            rank_state={"rng": ckpt.capture_rng()})
        if is_main:
            pruned = ckpt.prune_checkpoints(run.output_dir / "checkpoints", args.save_total_limit)
            progress.print(f"saved {path}" + (f" (removed {len(pruned)} old)" if pruned else ""))

    def run_eval() -> float:
        loss = evaluate(model, eval_set, device, reduce_sum)
        logger.log({"type": "eval", "step": step, "tokens": tokens, "loss": loss, "perplexity": math.exp(min(loss, 50))})
        if is_main and args.sample_tokens > 0:
            text = sample_text(raw_model, tokenizer, device, args.sample_tokens, args.seed)
            logger.text("sample", text, step)
            progress.print(f"step {step:,} eval loss {loss:.4f} | sample: {text!r}")
        return loss

    model.train()
    if step == 0:
        run_eval()
    interval_loss = torch.zeros((), device=device)
    interval_steps, interval_start, ctx_sum = 0, time.perf_counter(), 0.0
    flops_token = None
    command = None
    while step < plan.total_steps:
        for _ in range(args.gradient_accumulation_steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
            with accelerator.accumulate(model):
                loss = model(**batch)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            interval_loss += loss.detach() / args.gradient_accumulation_steps
            ctx_sum += float(mean_context(batch["doc_ids"]))
        step += 1
        tokens += plan.tokens_per_step
        interval_steps += 1

        if step % plan.logging_steps == 0 or step == plan.total_steps:
            elapsed = time.perf_counter() - interval_start
            mean_loss = (reduce_sum(interval_loss) / (interval_steps * accelerator.num_processes)).item()
            tps = interval_steps * plan.tokens_per_step / elapsed
            if flops_token is None:
                flops_token = lambda ctx: flops_per_token(run.model_cfg, ctx)
            ctx = ctx_sum / (interval_steps * args.gradient_accumulation_steps)
            record = {"type": "train", "step": step, "tokens": tokens, "loss": mean_loss, "lr": scheduler.current_lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": tps,
                      "mfu": mfu(tps / accelerator.num_processes, flops_token(ctx), peak),
                      "peak_mem_bytes": peak_mem.read_and_reset()}
            logger.log(record)
            progress.update(step, tokens, record)
            interval_loss.zero_()
            interval_steps, interval_start, ctx_sum = 0, time.perf_counter(), 0.0

        eval_loss = None
        if step % plan.eval_steps == 0:
            eval_loss = run_eval()
        if args.save_strategy == "steps" and step % plan.save_steps == 0:
            save(eval_loss if eval_loss is not None else run_eval())

        # Job control and signals: rank 0 polls, every rank learns the command at the same step.
        code = torch.tensor([COMMANDS.index(control.poll() if control else None), 2 * stop_signals.requested],
                            device=device)
        if accelerator.num_processes > 1:
            code = accelerator.reduce(code, reduction="max") if False else _all_reduce_max(code)
        command = COMMANDS[int(code.max())]
        if command in ("save", "stop") and args.save_strategy != "no":
            save(run_eval())
        if command in ("stop", "abort"):
            say(f"{command} requested at step {step:,}; stopping" + (" (checkpoints kept)" if command == "abort" else ""))
            break
    else:
        final_eval = run_eval()
        if args.save_strategy != "no":
            save(final_eval)
        if is_main:
            export_dir = run.output_dir / "final"
            models.export_hf(raw_model, run.model_cfg, export_dir, tokenizer=tokenizer)
            logger.log({"type": "summary", "step": step, "tokens": tokens, "loss": final_eval})
            progress.close()
            text = sample_text(raw_model, tokenizer, device, max(args.sample_tokens, 32), args.seed)
            print(f"final eval loss {final_eval:.4f}\nsample: {text}\nHugging Face model: {export_dir}")
    progress.close()
    logger.close()
    if control:
        control.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


COMMANDS = [None, "save", "stop", "abort"]


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def mean_context(doc_ids: torch.Tensor) -> float:
    from monitor import mean_attended_context

    return mean_attended_context(doc_ids)


def sample_text(model, tokenizer, device, max_new_tokens: int, seed: int) -> str:
    from monitor.samples import generate

    return generate(model, tokenizer, "The", max_new_tokens=max_new_tokens, device=device, seed=seed)


# -----------------------------------------------------------------------------
# Pipeline parallel training with DeepSpeed


def train_pipeline(run: Run) -> None:
    raise UsageError("not implemented yet: pipeline parallel (issue: scale out with DeepSpeed)")


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = resolve_run(args)
        if args.dry_run:
            print_plan(run)
            return 0
        if args.pipeline:
            train_pipeline(run)
        else:
            train_ddp(run)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
