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
import contextlib
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import models
import schedule
from models.hf import model_config_from_hf
from monitor import (
    DivergenceDetector,
    JobControl,
    Progress,
    RunLogger,
    device_peak_flops,
    new_run_dir,
    runinfo,
    samples,
    steering,
)
from monitor import checkpoint as ckpt
from monitor.meter import Meter

DEFAULT_MODEL = "deepone-162m"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see python train.py --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("token budget and batch")
    g.add_argument("--init-model", action="store_true", help="start a new model (default: resume the newest one)")
    g.add_argument("--total-tokens", type=float, default=3.0, help="training budget in billions of tokens")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run (overrides the budget)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per device per micro-step")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--max-length", type=int, default=4096, help="tokens per packed sequence")
    g = p.add_argument_group("learning rate")
    g.add_argument("--learning-rate", type=float, default=1.4e-5, help="peak LR for global batch 1 (scaled by sqrt)")
    g.add_argument("--warmup-steps", type=int, default=500, help="linear warmup from 0 to the peak LR, in steps")
    g.add_argument("--min-cooldown-tokens", type=float, default=100.0, help="minimum cooldown, billions of tokens")
    g.add_argument("--anneal-steps", type=int, default=0, help="anneal to min_lr over the last N steps (0 = never)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="named config in models/configs/ (e.g. tiny, llama-124m)")
    g.add_argument("--model-config", default=None, help="path to a model config JSON (overrides --model)")
    g.add_argument("--init-from", default=None, help="start from a Hugging Face model folder (continued pretraining)")
    g.add_argument(
        "--attn-implementation", default="sdpa", choices=models.ATTN_IMPLEMENTATIONS, help="attention kernel"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="smollm", help="smollm (Hub), builtin (offline), paths or a mix")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json, folder or Hub name (default: train one)")
    g.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size when a tokenizer is trained")
    g.add_argument("--tokenizer-docs", type=int, default=50_000, help="documents used to train a tokenizer")
    g.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    g.add_argument("--no-restore-dataset-state", action="store_true", help="on resume, restart the data from the start")
    g.add_argument("--dispatch-batches", action="store_true", help="rank 0 reads the data and sends each rank its rows")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"], help="update rule")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--no-stochastic-rounding", action="store_true", help="Adafactor on bf16 weights rounds to nearest")
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay")
    g.add_argument("--max-grad-norm", type=float, default=4.0, help="gradient clipping threshold (0 = off)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output-dir", default=None, help="run directory (default: output_models/<model name>)")
    g.add_argument("--overwrite-output-dir", action="store_true", help="with --init-model, delete earlier checkpoints")
    g.add_argument("--save-strategy", default="steps", choices=["no", "steps", "epoch"], help="when to checkpoint")
    g.add_argument("--save-total-limit", type=int, default=4, help="checkpoints kept (the best 2 by eval loss always)")
    g.add_argument("--step-cadence", type=float, default=1.0, help="scale the log/eval/save intervals")
    g.add_argument("--sample-tokens", type=int, default=48, help="tokens generated per text sample at eval (0 = none)")
    g.add_argument("--sample-temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument("--sample-top-k", type=int, default=40, help="sample among the k likeliest tokens (0 = all)")
    g.add_argument("--repetition-penalty", type=float, default=1.2, help="divide the logits of seen tokens (1 = off)")
    g = p.add_argument_group("divergence guard")
    g.add_argument(
        "--divergence-action", default="abort", choices=["abort", "stop", "rollback", "none"], help="on a blow-up"
    )
    g.add_argument("--divergence-threshold", type=float, default=1.0, help="max nats of fast minus slow loss EMA")
    g.add_argument("--max-rollbacks", type=int, default=3, help="rollbacks before giving up (abort)")
    g.add_argument("--rollback-lr-factor", type=float, default=0.5, help="LR multiplier applied at each rollback")
    g.add_argument("--inject-lr-spike", metavar="STEP,FACTOR", help="testing aid: LR x FACTOR from STEP on")
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
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
    """Checks outside the plan (make_plan checks sizes, budget, LR and cadence)."""
    for name in ("microbatch_scale", "eval_batches", "save_total_limit"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UsageError(f"--max-steps must be positive, got {args.max_steps}; omit it to train to the token budget")
    if args.json and not args.dry_run:
        raise UsageError("--json only applies to --dry-run")
    if args.world_size is not None and not args.dry_run:
        raise UsageError("--world-size only applies to --dry-run; launchers set the real world size")
    parse_lr_spike(args.inject_lr_spike)
    unsupported = {
        "--compile": args.compile,
        "--dispatch-batches": args.dispatch_batches,
        "--save-strategy epoch": args.save_strategy == "epoch",
    }
    for flag in (f for f, given in unsupported.items() if given and args.pipeline):
        raise UsageError(f"{flag} is not supported with --pipeline yet; drop it or train with DDP")
    if args.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise UsageError(
            f"--pipeline-schedule {args.pipeline_schedule} is not available with DeepSpeed's pipeline "
            f"engine; use one of {', '.join(sorted(set(PIPELINE_SCHEDULES.values())))}"
        )


def parse_lr_spike(text: str | None) -> dict:
    if not text:
        return {}
    try:
        step, factor = text.split(",")
        return {"step": int(step), "factor": float(factor)}
    except ValueError:
        raise UsageError(f"--inject-lr-spike {text!r} must be STEP,FACTOR, e.g. 100,50") from None


PIPELINE_SCHEDULES = {"1F1B": "1F1B", "Schedule1F1B": "1F1B", "GPipe": "GPipe", "ScheduleGPipe": "GPipe"}


@contextlib.contextmanager
def bad_input():
    """ValueError/FileNotFoundError from reading user-supplied things (data, tokenizer, configs) is bad input."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def resolve_run(args: argparse.Namespace) -> Run:
    with bad_input():
        return _resolve_run(args)


def _resolve_run(args: argparse.Namespace) -> Run:
    validate_args(args)
    models.check_attn_implementation(args.attn_implementation)  # a missing optional kernel fails here, not later
    if args.init_from and not args.tokenizer and (Path(args.init_from) / "tokenizer.json").is_file():
        args.tokenizer = args.init_from  # continued pretraining keeps the model's own tokenizer
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.pipeline and args.batch_size % (world_size * args.microbatch_scale):
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by stages × microbatch scale = "
            f"{world_size} × {args.microbatch_scale}; change --batch-size or --microbatch-scale"
        )
    plan = schedule.make_plan(  # every rank of a pipeline is a stage: one data-parallel replica
        total_tokens=args.total_tokens,
        batch_size=args.batch_size,
        grad_accum=args.gradient_accumulation_steps,
        world_size=1 if args.pipeline else world_size,
        max_length=args.max_length,
        base_lr=args.learning_rate,
        warmup_steps=args.warmup_steps,
        min_cooldown_tokens=args.min_cooldown_tokens,
        step_cadence=args.step_cadence,
        max_steps=args.max_steps,
        anneal_steps=args.anneal_steps,
    )
    model_name = args.model_config or args.model
    output_dir = Path(args.output_dir or Path("output_models") / Path(model_name).stem)
    checkpoints = output_dir / "checkpoints"
    resume_from = None
    if not args.init_model and not args.dry_run:
        resume_from = ckpt.latest_checkpoint(checkpoints, warn=lambda m: rank == 0 and print(m, file=sys.stderr))
    if args.init_model and ckpt.checkpoint_dirs(checkpoints) and not args.overwrite_output_dir and not args.dry_run:
        raise UsageError(
            f"{output_dir} already holds checkpoints; drop --init-model to resume them, choose another "
            "--output-dir, or add --overwrite-output-dir to delete them"
        )

    vocab_size = None
    if args.tokenizer:
        vocab_size = len(data.load_tokenizer(args.tokenizer))
    elif (output_dir / "tokenizer").is_dir() and not args.init_model:
        vocab_size = len(data.load_tokenizer(output_dir / "tokenizer"))
    elif args.init_from is None:
        vocab_size = args.vocab_size
    if args.init_from:
        if not (Path(args.init_from) / "config.json").is_file():
            raise UsageError(f"--init-from {args.init_from} is not a Hugging Face model folder (no config.json)")
        model_cfg = model_config_from_hf(json.loads((Path(args.init_from) / "config.json").read_text()))
        if vocab_size is not None and vocab_size > model_cfg.vocab_size:
            raise UsageError(
                f"the tokenizer has {vocab_size:,} tokens but {args.init_from} embeds only "
                f"{model_cfg.vocab_size:,}; pass the model's own tokenizer with --tokenizer"
            )
    else:
        model_cfg = models.load_model_config(model_name, vocab_size=vocab_size)
    if args.max_length > model_cfg.max_position_embeddings:
        raise UsageError(
            f"--max-length {args.max_length} is longer than the model supports "
            f"({model_cfg.max_position_embeddings}); lower --max-length or raise max_position_embeddings"
        )
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        if saved["model_config"] != model_cfg.to_dict():
            raise UsageError(
                f"{output_dir} holds a different model ({saved['model_name']}); use another --output-dir, "
                "or --init-model --overwrite-output-dir to replace it"
            )

    run = Run(args, plan, model_cfg, output_dir, resume_from, world_size, rank)
    run.extra["mix"] = None if args.dry_run else data.parse_mix(args.dataset)  # ValueError for a missing path
    return run


def print_plan(run: Run) -> None:
    counts = models.count_parameters(run.model_cfg)
    plan = run.plan.to_dict() | {
        "parameters": counts,
        "model": run.args.model_config or run.args.model,
        "world_size": run.world_size,
        "pipeline": run.args.pipeline,
    }
    if run.args.json:
        print(json.dumps(plan))
    else:
        print(schedule.format_plan(run.plan))
        print(
            f"model {plan['model']}: {counts['total'] / 1e6:.1f}M parameters "
            f"({counts['non_embedding'] / 1e6:.1f}M without embeddings); world size {run.world_size}"
        )


# -----------------------------------------------------------------------------
# Pieces shared by both training paths


def build_tokenizer(run: Run, is_main: bool, barrier):
    """Load --tokenizer, reuse the run's own, or train one from the data (the main rank trains, the others wait)."""

    def resolve():
        return data.resolve_tokenizer(
            run.args.tokenizer,
            run.extra["mix"],
            run.output_dir,
            vocab_size=run.args.vocab_size,
            max_docs=run.args.tokenizer_docs,
        )

    tok = resolve() if is_main else None
    barrier()
    return tok if is_main else resolve()


def build_model(run: Run, dtype: torch.dtype) -> models.Transformer:
    """The same initial weights on every rank and in both training paths: seeded, built on the CPU."""
    torch.manual_seed(run.args.seed)
    if run.args.init_from:
        model, _ = models.load_hf(run.args.init_from, run.args.attn_implementation)
    else:
        model = models.Transformer(run.model_cfg, attn_implementation=run.args.attn_implementation)
        model.init_weights()
    return model.to(dtype=dtype)


def build_optimizer(run: Run, module: torch.nn.Module):
    """The optimizer (peak LR from the plan) and the InfiniteLR schedule that drives it, step by step."""
    args = run.args
    optimizer = schedule.build_optimizer(
        args.optimizer,
        module,
        run.plan.max_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        stochastic_rounding=not args.no_stochastic_rounding,
    )
    return optimizer, schedule.InfiniteLR(optimizer, run.plan)


def trainer_state(run: Run, progress: dict, stream, eval_loss: float | None) -> dict:
    """The JSON part of a checkpoint: counters, schedule, data position, and what the run is."""
    return {
        **progress,
        "eval_loss": eval_loss,
        "world_size": run.world_size,
        "model_name": run.args.model_config or run.args.model,
        "model_config": run.model_cfg.to_dict(),
        "plan": run.plan.to_dict(),
        "args": vars(run.args),
        "data_state": stream.state_dict(),
        "run_info": run.extra.get("info", {}),
    }


def start_monitoring(run: Run, progress: dict, is_main: bool, vocab_size: int):
    """The run directory (reused on resume), logs, run info, progress display, job control and stop signals."""
    resuming = progress["run_dir"] is not None
    run_dir = Path(progress["run_dir"]) if resuming else new_run_dir(run.output_dir)
    progress["run_dir"] = str(run_dir)
    logger = RunLogger(run_dir, enabled=is_main, resume_step=progress["step"] if resuming else None)
    run.extra["info"] = runinfo.collect(
        args=vars(run.args),
        plan=run.plan.to_dict(),
        model_config=run.model_cfg,
        world_size=run.world_size,
        parameters=models.count_parameters(run.model_cfg),
        data={"dataset": run.args.dataset, "vocab": vocab_size},
    )
    if is_main:
        runinfo.write(run_dir, run.extra["info"])
        if run.args.verbose_info:
            runinfo.show(run.extra["info"])
        print(schedule.format_plan(run.plan), flush=True)
    bar = Progress(run.plan.total_steps, run.plan.total_train_tokens, enabled=is_main, start_step=progress["step"])
    control = JobControl(run.output_dir, run.output_dir.name, enabled=is_main)
    return logger, bar, control, steering.StopSignals()


def sample_text(model, tokenizer, device, args: argparse.Namespace, max_new_tokens: int) -> str:
    return samples.generate(
        model,
        tokenizer,
        samples.PROMPTS[0],
        max_new_tokens=max_new_tokens,
        temperature=args.sample_temperature,
        top_k=args.sample_top_k,
        repetition_penalty=args.repetition_penalty,
        device=device,
        seed=args.seed,
    )


# -----------------------------------------------------------------------------
# Data parallel training with Accelerate


def train_ddp(run: Run) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    args, plan = run.args, run.plan
    cpu = not torch.cuda.is_available()
    dtype = schedule.resolve_dtype(args.dtype, torch.device("cpu" if cpu else "cuda"))
    pure_bf16 = dtype == torch.bfloat16 and args.optimizer == "adafactor"  # bf16 weights + stochastic rounding
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if dtype == torch.bfloat16 and not pure_bf16 else "no",
        kwargs_handlers=[InitProcessGroupKwargs(backend=args.dist_backend or ("gloo" if cpu else "nccl"))]
        if run.world_size > 1
        else [],
    )
    device, is_main, rank, world = (
        accelerator.device,
        accelerator.is_main_process,
        accelerator.process_index,
        accelerator.num_processes,
    )
    run.world_size = world
    # NOTE: under FSDP the weights and optimizer state are sharded: a forward needs every rank (so no text samples on
    # the main rank alone), and our checkpoints do not gather sharded optimizer state yet.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and args.save_strategy != "no":
        raise UsageError(
            "checkpoints are not supported with FSDP yet (sharded optimizer state); pass "
            "--save-strategy no, or train with DDP or --pipeline"
        )
    if fsdp:
        args.sample_tokens = 0
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.init_model and args.overwrite_output_dir and is_main:
        ckpt.remove_checkpoints(run.output_dir / "checkpoints")

    # ---- model, optimizer, schedule, data
    with bad_input():
        tokenizer = build_tokenizer(run, is_main, accelerator.wait_for_everyone)
    model = build_model(run, torch.bfloat16 if pure_bf16 else torch.float32).to(device)
    optimizer, scheduler = build_optimizer(run, model)
    with bad_input():
        stream = data.PackedStream(
            run.extra["mix"],
            tokenizer,
            args.max_length,
            args.batch_size,
            rank=rank,
            world_size=world,
            seed=args.seed,
            dispatch=args.dispatch_batches,
        )
        eval_set = data.eval_batches(
            run.extra["mix"],
            tokenizer,
            args.max_length,
            args.batch_size,
            args.eval_batches,
            rank=rank,
            world_size=world,
        )
    detector = DivergenceDetector(args.divergence_threshold, warmup_steps=plan.warmup_steps)
    progress = {"step": 0, "tokens": 0, "lr_factor": 1.0, "rollbacks": 0, "run_dir": None}

    def restore(path: Path, data_too: bool) -> None:
        state = ckpt.load_checkpoint(path, rank)
        accelerator.unwrap_model(model).load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        saved = state["trainer_state"]
        progress.update({k: saved[k] for k in progress if k in saved})
        scheduler.lr_factor = progress["lr_factor"]
        scheduler.load_state_dict({"step": progress["step"]})
        detector.load_state_dict(saved["divergence"])
        if data_too:
            stream.load_state_dict(saved["data_state"])  # ValueError (exit 2) when the data mix changed
        if state["rank_state"] is not None and saved["world_size"] == world:
            ckpt.restore_rng(state["rank_state"]["rng"])

    if run.resume_from is not None:
        with bad_input():
            restore(run.resume_from, data_too=not args.no_restore_dataset_state)
        if args.no_restore_dataset_state:
            accelerator.print("data: --no-restore-dataset-state given, restarting the data from the beginning")
        accelerator.print(f"resumed from {run.resume_from} at step {progress['step']:,}")
    if args.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Batches are prepared on a thread while the model trains (a dispatched stream must stay on this thread).
    batches = stream if stream.dispatch else data.Prefetcher(stream)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # plain names in checkpoints

    # ---- logging, job control, signals
    logger, bar, control, signals = start_monitoring(run, progress, is_main, len(tokenizer))
    lr_spike = parse_lr_spike(args.inject_lr_spike)

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, reduction="sum") if world > 1 else t

    def save(eval_loss: float | None) -> None:
        if fsdp:
            return bar.print("checkpoints are not supported with FSDP yet; not saved")
        progress["divergence"] = detector.state_dict()
        if (run.output_dir / "checkpoints" / f"checkpoint-{progress['step']}" / ckpt.MARKER).is_file():
            return  # saved already at this step (an exact resume makes the state identical)
        path = ckpt.save_checkpoint(
            run.output_dir / "checkpoints",
            progress["step"],
            rank=rank,
            barrier=accelerator.wait_for_everyone,
            model_state=raw_model.state_dict() if is_main else None,
            optimizer_state=optimizer.state_dict() if is_main else None,
            trainer_state=trainer_state(run, progress, batches, eval_loss),
            rank_state={"rng": ckpt.capture_rng()},
        )
        if is_main:
            pruned = ckpt.prune_checkpoints(run.output_dir / "checkpoints", args.save_total_limit)
            bar.print(f"saved {path}" + (f" (removed {len(pruned)} older)" if pruned else ""))

    def run_eval() -> float:
        loss = samples.evaluate(model, eval_set, device, reduce_sum)
        step = progress["step"]
        logger.eval(step, tokens=progress["tokens"], loss=loss)
        if is_main and args.sample_tokens > 0:
            text = sample_text(raw_model, tokenizer, device, args, args.sample_tokens)
            logger.text("sample", text, step)
            bar.print(f"step {step:,} | eval loss {loss:.4f} | sample: {text!r}")
        return loss

    # ---- the loop
    model.train()
    if progress["step"] == 0:
        run_eval()
    meter = Meter(run.model_cfg, plan.tokens_per_step, world, device_peak_flops(device, dtype), device)
    command, exit_code, eval_loss = None, 0, None
    stage, epoch = batches.current_stage, batches.epoch
    while progress["step"] < plan.total_steps:
        step = progress["step"] + 1
        if "factor" in lr_spike and step == int(lr_spike["step"]):  # testing aid for the divergence guard: applied once
            scheduler.lr_factor *= lr_spike.pop("factor")
            scheduler.load_state_dict(scheduler.state_dict())  # re-apply the LR for this update
        step_loss = torch.zeros((), device=device)
        micro_batches = [next(batches) for _ in range(args.gradient_accumulation_steps)]
        # NOTE: normalise by the label count of the whole global batch, not per micro-batch and rank, so the loss and
        # gradients equal a single process's over the same rows (accumulate() divides by the micro-steps and DDP
        # averages over ranks, hence the factor).
        labels = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
        num_items = reduce_sum(torch.tensor(float(labels), device=device)) / (world * len(micro_batches))
        for batch in micro_batches:
            meter.add_micro_batch(batch["doc_ids"])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss = model(**batch, num_items=num_items)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / args.gradient_accumulation_steps
        progress["step"], progress["tokens"] = step, progress["tokens"] + plan.tokens_per_step
        meter.add_step(step_loss)
        if batches.current_stage != stage:  # a curriculum moved on to its next mix
            stage = batches.current_stage
            logger.event(step, "stage", stage=stage, dataset=args.dataset)
            bar.print(f"step {step:,}: data stage {stage} of {args.dataset}")
        if step % plan.logging_steps == 0 or step == plan.total_steps:
            record = logger.train(
                step,
                tokens=progress["tokens"],
                lr=scheduler.current_lr,
                grad_norm=None if grad_norm is None else float(grad_norm),
                **meter.record(reduce_sum),
            )
            bar.update(step, progress["tokens"], record or {})

        # Every rank learns, at the same step, what job control, signals and the divergence guard ask for.
        reason = detector.update(step, step_loss.item(), None if grad_norm is None else float(grad_norm))
        eval_loss = run_eval() if step % plan.eval_steps == 0 else None
        if eval_loss is not None:
            reason = reason or detector.update_eval(step, eval_loss)
        wish = control.poll() or ("stop" if signals.requested else None)
        if args.save_strategy == "epoch" and batches.epoch != epoch:  # a pass over the data just ended
            epoch, wish = batches.epoch, wish or "save"
        command = steering.agree(steering.divergence_wish(reason, args.divergence_action, wish), device, world)
        if command in ("abort", "stop", "rollback") and reason:
            logger.event(step, "divergence", reason=reason, action=command)
            bar.print(f"divergence at step {step:,}: {reason}; action: {command}")
        if command == "rollback":
            last = ckpt.latest_checkpoint(run.output_dir / "checkpoints")
            if last is None or progress["rollbacks"] >= args.max_rollbacks:
                command = "abort"
            else:
                rollbacks = progress["rollbacks"] + 1
                restore(last, data_too=False)  # keep the data position: the offending batches are skipped
                progress["rollbacks"] = rollbacks
                progress["lr_factor"] *= args.rollback_lr_factor
                scheduler.lr_factor = progress["lr_factor"]
                scheduler.load_state_dict({"step": progress["step"]})
                logger.event(progress["step"], "rollback", to=str(last), lr_factor=progress["lr_factor"])
                continue
        scheduled = args.save_strategy == "steps" and step % plan.save_steps == 0
        if command in ("save", "stop") or (scheduled and command != "abort"):
            save(eval_loss if eval_loss is not None else run_eval())
        if command in ("stop", "abort"):
            last = ckpt.latest_checkpoint(run.output_dir / "checkpoints")
            bar.print(f"{command} at step {step:,}; newest checkpoint: {last}")
            exit_code = 1 if reason else 0
            break
    else:
        final_eval = eval_loss if progress["step"] and eval_loss is not None else run_eval()
        if args.save_strategy != "no":
            save(final_eval)  # a no-op when this step was just saved
        logger.summary(progress["step"], tokens=progress["tokens"], loss=final_eval)
        bar.close()
        final_model, full_state = raw_model, accelerator.get_state_dict(model)  # gathered on the main rank under FSDP
        if is_main and fsdp:
            final_model = models.Transformer(run.model_cfg, args.attn_implementation)
            final_model.load_state_dict(full_state)
            final_model.to(device)
        if is_main:
            export_dir = models.export_hf(final_model, run.model_cfg, run.output_dir / "final", tokenizer=tokenizer)
            text = sample_text(final_model, tokenizer, device, args, max(args.sample_tokens, 32))
            print(f"final eval loss {final_eval:.4f}\nsample: {text}\nHugging Face model: {export_dir}", flush=True)
    bar.close()
    logger.close()
    control.close()
    if batches is not stream:
        batches.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


# -----------------------------------------------------------------------------
# Pipeline parallel training with DeepSpeed


def train_pipeline(run: Run) -> int:
    """Each rank is one pipeline stage; the batch is split into stages × microbatch_scale micro-batches."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from models.pipe_engine import assemble_stages, deepspeed_config, use_gpipe

    args, plan = run.args, run.plan
    cpu = not torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend=args.dist_backend or ("gloo" if cpu else "nccl"))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not cpu:
        torch.cuda.set_device(device)
    is_main, barrier = rank == 0, torch.distributed.barrier
    dtype = schedule.resolve_dtype(args.dtype, device)
    pure_bf16 = dtype == torch.bfloat16 and args.optimizer == "adafactor"
    if args.init_model and args.overwrite_output_dir and is_main:
        ckpt.remove_checkpoints(run.output_dir / "checkpoints")

    # ---- the model as a layer list, the DeepSpeed config filled from our plan (one source of truth)
    with bad_input():
        tokenizer = build_tokenizer(run, is_main, barrier)
    micro = args.batch_size // (world * args.microbatch_scale)
    ds_config, pipe_opts = deepspeed_config(
        Path(__file__).parent / "ds_configs" / "pipeline.json",
        batch_size=args.batch_size,
        micro_batch=micro,
        grad_accum=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        bf16=dtype == torch.bfloat16 and not pure_bf16,
    )
    net = PipelineModule(
        layers=models.pipeline_layers(run.model_cfg, args.attn_implementation),
        num_stages=world,
        loss_fn=lambda loss, labels: loss,
        **pipe_opts,
    )  # the last layer already returns the loss
    models.load_pipeline_state(net, build_model(run, torch.float32).state_dict(), run.model_cfg)  # same init as DDP
    net.to(device=device, dtype=torch.bfloat16 if pure_bf16 else torch.float32)
    optimizer, scheduler = build_optimizer(run, net)
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)
    if PIPELINE_SCHEDULES[args.pipeline_schedule] == "GPipe":
        use_gpipe(engine)
    if is_main:
        print(
            f"pipeline: {world} stages, {engine.micro_batches} micro-batches of {micro} sequences, "
            f"schedule {PIPELINE_SCHEDULES[args.pipeline_schedule]}; DeepSpeed config {json.dumps(ds_config)}"
        )

    # The first stage feeds inputs and the last one labels: both read the same single stream of micro-batches.
    feeds = engine.is_first_stage() or engine.is_last_stage()
    stream = data.PackedStream(run.extra["mix"], tokenizer, args.max_length, micro, seed=args.seed) if feeds else None
    eval_rows = data.eval_batches(
        run.extra["mix"], tokenizer, args.max_length, micro, args.eval_batches * (args.batch_size // micro)
    )

    def micro_batches(batches):
        for b in batches:
            yield (b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"]), b["labels"]

    progress = {"step": 0, "tokens": 0, "run_dir": None}
    if run.resume_from is not None:
        resume_stages(run, net, optimizer, scheduler, stream, progress, rank, world)
    logger, bar, control, signals = start_monitoring(run, progress, is_main, len(tokenizer))
    detector = DivergenceDetector(args.divergence_threshold, warmup_steps=plan.warmup_steps)

    def stage_files(folder: Path) -> None:
        ckpt.save_state_dict(net.state_dict(), folder / f"stage-{rank}.safetensors")
        torch.save(optimizer.state_dict(), folder / f"optimizer-{rank}.pt")

    def save(eval_loss: float) -> None:
        state = trainer_state(run, progress, stream, eval_loss) if is_main else None
        path = ckpt.save_checkpoint(
            run.output_dir / "checkpoints",
            progress["step"],
            rank=rank,
            barrier=barrier,
            model_state=None,
            optimizer_state=None,
            trainer_state=state,
            rank_state={"rng": ckpt.capture_rng()},
            extra_files=stage_files,
        )
        if is_main:
            ckpt.prune_checkpoints(run.output_dir / "checkpoints", args.save_total_limit)
            bar.print(f"saved {path}")

    def run_eval() -> float:
        engine.eval()
        loss = engine.eval_batch(micro_batches(eval_rows), num_micro_batches=len(eval_rows)).item()
        engine.train()
        logger.eval(progress["step"], tokens=progress["tokens"], loss=loss)
        return loss

    if progress["step"] == 0:
        run_eval()
    exit_code = 0
    # All stages share one device budget: MFU per device = (whole-pipeline tokens/s ÷ stages) over one device's peak.
    meter = Meter(run.model_cfg, plan.tokens_per_step, world, device_peak_flops(device, dtype), device)
    while progress["step"] < plan.total_steps:
        loss = engine.train_batch(micro_batches(stream) if feeds else None).item()  # the same value on every stage
        scheduler.step()
        progress["step"] += 1
        progress["tokens"] += plan.tokens_per_step
        step = progress["step"]
        meter.add_step(loss * world)  # the same loss on every stage: undo the meter's mean over ranks
        if step % plan.logging_steps == 0 or step == plan.total_steps:
            grad_norm = engine.get_global_grad_norm()
            record = logger.train(
                step,
                tokens=progress["tokens"],
                lr=scheduler.current_lr,
                grad_norm=None if grad_norm is None else float(grad_norm),
                **meter.record(),
            )
            bar.update(step, progress["tokens"], record or {})
        reason = detector.update(step, loss)
        eval_loss = run_eval() if step % plan.eval_steps == 0 else None
        wish = control.poll() or ("stop" if signals.requested else None)
        action = "stop" if args.divergence_action == "rollback" else args.divergence_action  # no pipeline rollback
        command = steering.agree(steering.divergence_wish(reason, action, wish), device, world)
        if reason and command in ("stop", "abort"):
            logger.event(step, "divergence", reason=reason, action=command)
        scheduled = args.save_strategy == "steps" and step % plan.save_steps == 0
        if command in ("save", "stop") or (scheduled and command != "abort"):
            save(eval_loss if eval_loss is not None else run_eval())
        if command in ("stop", "abort"):
            bar.print(f"{command} at step {step:,}")
            exit_code = 1 if reason else 0
            break
    else:
        final_eval = run_eval()
        if args.save_strategy != "no":
            save(final_eval)
        # Assemble the HF export from every stage's weights.
        parts = run.output_dir / "final" / ".stages"
        if is_main:
            parts.mkdir(parents=True, exist_ok=True)
        barrier()
        ckpt.save_state_dict(net.state_dict(), parts / f"stage-{rank}.safetensors")
        barrier()
        if is_main:
            full = assemble_stages(
                [parts / f"stage-{k}.safetensors" for k in range(world)], run.model_cfg, args.attn_implementation
            )
            shutil.rmtree(parts)
            export_dir = models.export_hf(full, run.model_cfg, run.output_dir / "final", tokenizer=tokenizer)
            logger.summary(step, tokens=progress["tokens"], loss=final_eval)
            bar.close()
            print(f"final eval loss {final_eval:.4f}\nHugging Face model: {export_dir}", flush=True)
    bar.close()
    logger.close()
    control.close()
    barrier()
    return exit_code


def resume_stages(run: Run, net, optimizer, scheduler, stream, progress: dict, rank: int, world: int) -> None:
    """Load this stage's weights, optimizer state, RNG and (first/last stage) data position from the checkpoint."""
    saved = json.loads((run.resume_from / "trainer_state.json").read_text())
    if saved["world_size"] != world:
        raise UsageError(
            f"{run.resume_from} was written by {saved['world_size']} pipeline stages; resume it with "
            f"{saved['world_size']} processes (stage files cannot be re-split)"
        )
    net.load_state_dict(ckpt.load_state_dict_file(run.resume_from / f"stage-{rank}.safetensors"))
    optimizer.load_state_dict(torch.load(run.resume_from / f"optimizer-{rank}.pt", weights_only=True))
    progress.update({k: saved[k] for k in progress})
    scheduler.load_state_dict({"step": progress["step"]})
    if stream is not None and not run.args.no_restore_dataset_state:
        with bad_input():
            stream.load_state_dict(saved["data_state"])
    ckpt.restore_rng(json.loads((run.resume_from / f"rank-{rank}.json").read_text())["rng"])
    if rank == 0:
        print(f"resumed from {run.resume_from} at step {progress['step']:,}", flush=True)


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = resolve_run(args)
        if args.dry_run:
            print_plan(run)
            return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return train_pipeline(run) if args.pipeline else train_ddp(run)
    except UsageError as e:  # found once training was set up (e.g. a changed data mix on resume)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        safe = ckpt.latest_checkpoint(run.output_dir / "checkpoints", warn=lambda m: None)
        print(
            f"error: training failed (traceback above); newest complete checkpoint: {safe or 'none'}", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
