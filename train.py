"""Pretrain a small language model on a token budget.

One process (CPU or one GPU):
    python train.py --total-tokens 3
Data parallel through Accelerate (single node, multi-node):
    accelerate launch --config_file accelerate_configs/4gpu.yaml train.py --total-tokens 3
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml train.py --model tiny --dataset builtin ...
Fully sharded (FSDP2; an Accelerate config with distributed_type FSDP selects it):
    accelerate launch --config_file accelerate_configs/fsdp.yaml train.py --model llama-3b
    accelerate launch --config_file accelerate_configs/cpu_fsdp.yaml train.py --model tiny --dataset builtin ...
Pipeline parallel (1F1B and GPipe on DeepSpeed's PipelineModule, one stage per process; the interleaved, looped
and zero-bubble schedules on torch.distributed.pipelining, two stages per process; deepspeed or torchrun launch):
    deepspeed train.py --pipeline --pipeline-schedule 1F1B
    deepspeed train.py --pipeline --pipeline-schedule ScheduleInterleaved1F1B
    torchrun --nproc_per_node 4 train.py --pipeline --pipeline-stages 2     (2 stages x 2 data-parallel replicas)
See the plan without running anything:
    python train.py --dry-run --world-size 4 [--pipeline] [--json]

Reading order: arguments -> main() resolves the plan and picks a layout (DataParallel, FSDP or Pipeline) -> train(), the
one loop for every layout: evaluation, the divergence guard, job control, rollback, saving, stopping and the export.
A layout supplies only its step, its evaluation and how its weights and optimizer state are gathered and restored.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # a stop signal during the slow imports below ends the start quietly
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, frame: sys.exit(128 + signum))

import argparse
import json
import math
import os
import secrets
import threading
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import data
import models
import schedule
from data.tokenizer import tokenizer_hash
from models.hf import check_hf_folder
from models.memory import format_memory
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
from monitor.checkpoint import Checkpointer, capture_rng, checkpoint_dirs, latest_checkpoint, restore_rng
from monitor.meter import Meter
from monitor.outdir import OutputDirLock, publish_dir
from monitor.progress import say
from parallel import (
    PIPELINE_ENGINES,
    DataParallel,
    FullyShardedDataParallel,
    Pipeline,
    Run,
    TorchPipeline,
    UsageError,
    bad_input,
    fsdp_requested,
    pipeline_engine,
)
from parallel.common import publish_tokenizer, staged_tokenizer
from parallel.inputs import (
    backend,
    bounded,
    check_jobs_dir,
    check_memory,
    check_output_dir,
    check_replaceable,
    check_resume,
    model_mismatch,
    parse_lr_spike,
    run_memory,
    take_output_dir,
    validate_args,
)

DEFAULT_MODEL = "deepone-162m"
# Option ranges (parallel/inputs.py): NaN, infinities and out-of-range values are refused when parsed.
COUNT, COUNT0 = bounded(int, 1), bounded(int, 0)
POSITIVE, NONNEGATIVE = bounded(float, above=0), bounded(float, 0)
STEPS, LENGTH, SEED = bounded(int, 1, sentinel=-1), bounded(int, 2), bounded(int, 0, 2**32 - 1)
VOCAB, FACTOR = bounded(int, 260, 2**31 - 1), bounded(float, high=1, above=0)  # 260: 256 bytes, BOS, EOS


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see python train.py --help\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("token budget and batch")
    g.add_argument(
        "--init-model", action="store_true", help="start a new model instead of resuming the newest checkpoint"
    )
    g.add_argument("--total-tokens", type=POSITIVE, default=3.0, help="training budget in billions of tokens")
    g.add_argument("--max-steps", type=STEPS, default=-1, help="optimizer steps to run; -1 = train to the budget")
    g.add_argument("--batch-size", type=COUNT, default=4, help="sequences per device per micro-step")
    g.add_argument("--gradient-accumulation-steps", type=COUNT, default=1, help="micro-steps per optimizer step")
    g.add_argument("--max-length", type=LENGTH, default=4096, help="tokens per packed sequence")
    g = p.add_argument_group("learning rate")
    g.add_argument("--learning-rate", type=POSITIVE, default=1.4e-5, help="peak LR for global batch 1 (scaled by sqrt)")
    g.add_argument("--warmup-steps", type=COUNT0, default=500, help="linear warmup from 0 to the peak LR, in steps")
    g.add_argument("--min-cooldown-tokens", type=NONNEGATIVE, default=100.0, help="min cooldown, billions of tokens")
    g.add_argument("--anneal-steps", type=COUNT0, default=0, help="anneal to min_lr over the last N steps (0 = never)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="named config in models/configs/ (e.g. tiny, llama-124m)")
    g.add_argument("--model-config", default=None, help="path to a model config JSON (overrides --model)")
    g.add_argument("--init-from", default=None, help="start from a Hugging Face model folder (continued pretraining)")
    g.add_argument(
        "--attn-implementation", default="sdpa", choices=models.ATTN_IMPLEMENTATIONS, help="attention kernel"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the training loss path (slow first step)")
    g.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in the backward (less memory)"
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="smollm", help="smollm (Hub), smollm=PATH, builtin (offline), paths or a mix")
    g.add_argument("--text-column", default="text", help="field holding each document in file and Hub sources")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json, folder or Hub name (None: train one)")
    g.add_argument("--vocab-size", type=VOCAB, default=32768, help="vocabulary size when a tokenizer is trained")
    g.add_argument("--tokenizer-docs", type=COUNT, default=50_000, help="documents used to train a tokenizer")
    g.add_argument("--eval-batches", type=COUNT, default=8, help="held-out global batches per evaluation")
    g.add_argument("--no-restore-dataset-state", action="store_true", help="on resume, restart the data from the start")
    g.add_argument(
        "--allow-tokenizer-change", action="store_true", help="resume a run with a tokenizer other than its own"
    )
    g.add_argument("--dispatch-batches", action="store_true", help="rank 0 reads the data and sends each rank its rows")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw", "muon"], help="update rule")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--no-stochastic-rounding", action="store_true", help="Adafactor on bf16 weights rounds to nearest")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.01, help="decoupled weight decay")
    g.add_argument("--max-grad-norm", type=NONNEGATIVE, default=4.0, help="clip the global gradient norm (0 = off)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output-dir", default=None, help="run directory (None: output_models/<model name>)")
    g.add_argument("--overwrite-output-dir", action="store_true", help="with --init-model, delete earlier checkpoints")
    g.add_argument("--save-strategy", default="steps", choices=["no", "steps", "epoch"], help="when to checkpoint")
    g.add_argument("--save-total-limit", type=COUNT, default=4, help="checkpoints kept (always the best 2 by eval)")
    g.add_argument("--step-cadence", type=POSITIVE, default=1.0, help="scale the log/eval/save intervals")
    g.add_argument("--sample-tokens", type=COUNT0, default=48, help="tokens per text sample at each eval (0 = none)")
    g.add_argument("--sample-temperature", type=NONNEGATIVE, default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument("--sample-top-k", type=COUNT0, default=40, help="sample among the k likeliest tokens (0 = all)")
    g.add_argument("--repetition-penalty", type=POSITIVE, default=1.2, help="shrink logits of seen tokens (1 = off)")
    g = p.add_argument_group("divergence guard")
    g.add_argument(
        "--divergence-action", default="abort", choices=["abort", "stop", "rollback", "none"], help="on a blow-up"
    )
    g.add_argument("--divergence-threshold", type=POSITIVE, default=1.0, help="max nats of fast minus slow loss EMA")
    g.add_argument("--max-rollbacks", type=COUNT0, default=3, help="rollbacks before giving up (abort)")
    g.add_argument("--rollback-lr-factor", type=FACTOR, default=0.5, help="LR multiplier applied at each rollback")
    g.add_argument("--inject-lr-spike", metavar="STEP,FACTOR", help="testing aid: LR x FACTOR from STEP on")
    g.add_argument("--seed", type=SEED, default=42, help="seed for init, data order and sampling")
    g = p.add_argument_group("distributed")
    g.add_argument(
        "--dist-backend", type=backend, default=None, help="torch.distributed backend (None: nccl on GPU, gloo on CPU)"
    )
    g.add_argument("--pipeline", action="store_true", help="pipeline parallel (launch with deepspeed or torchrun)")
    g.add_argument(
        "--pipeline-schedule",
        default="1F1B",
        help="GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble or ZBVZeroBubble (Schedule... too)",
    )
    g.add_argument(
        "--pipeline-engine",
        default=None,
        choices=list(PIPELINE_ENGINES),
        help="None: deepspeed for 1F1B/GPipe, torch (torch.distributed.pipelining) for the 2-stage-per-rank schedules",
    )
    g.add_argument(
        "--pipeline-stages",
        type=COUNT,
        default=None,
        help="processes per pipeline; world size / K data-parallel replicas (None: the world size, one pipeline)",
    )
    g.add_argument("--microbatch-scale", type=COUNT, default=1, help="with --pipeline: multiply the micro-batches")
    g.add_argument("--local_rank", "--local-rank", type=COUNT0, help=argparse.SUPPRESS)  # set by deepspeed
    g = p.add_argument_group("debugging")
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    g.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object")
    g.add_argument("--world-size", type=COUNT, default=None, help="with --dry-run: plan for N processes")
    g.add_argument("--verbose-info", action="store_true", help="print the full resolved configuration at start")
    g.add_argument("--skip-memory-check", action="store_true", help="start even when the memory estimate exceeds")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# -----------------------------------------------------------------------------
# Resolve and validate everything cheap before any expensive work


def resolve_run(args: argparse.Namespace) -> Run:
    held: list[OutputDirLock] = []
    try:
        with bad_input():
            return _resolve_run(args, held)
    except BaseException:  # a refused start lets go of the output dir at once (tests start many in one process)
        for lock in held:
            lock.release()
        raise


def _resolve_run(args: argparse.Namespace, held: list[OutputDirLock]) -> Run:
    validate_args(args)
    if args.compile and fsdp_requested():
        raise UsageError("--compile is not supported with FSDP yet (untested with sharded blocks); drop --compile")
    models.check_attn_implementation(args.attn_implementation)  # a missing optional kernel fails here, not later
    tokenizer = args.tokenizer
    if args.init_from and not tokenizer and (Path(args.init_from) / "tokenizer.json").is_file():
        tokenizer = args.init_from  # continued pretraining keeps the model's own tokenizer
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    geometry = None
    if args.pipeline:
        geometry = schedule.pipeline_geometry(
            args.pipeline_schedule,
            batch_size=args.batch_size,
            world_size=world_size,
            microbatch_scale=args.microbatch_scale,
            grad_accum=args.gradient_accumulation_steps,
            pipeline_ranks=args.pipeline_stages,
        )
        pipeline_engine(geometry, args.pipeline_engine)  # UsageError: DeepSpeed cannot hold 2 stages per rank
    plan = schedule.make_plan(  # a pipeline's global batch is world x batch size too (the spec's pipeline batch)
        total_tokens=args.total_tokens,
        batch_size=args.batch_size,
        grad_accum=args.gradient_accumulation_steps,
        world_size=world_size,
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
    if not args.dry_run:
        check_output_dir(output_dir)  # a file, or a folder this process cannot write: refused before any work
        check_jobs_dir()
    lock = None
    if not args.dry_run and output_dir.is_dir():  # before anything in it is read: no other run is changing it
        lock = take_output_dir(output_dir, held)
    if args.init_model and args.overwrite_output_dir and not args.dry_run:
        check_replaceable(output_dir)
    resume_from, changed = None, []
    if not args.init_model and not args.dry_run:
        resume_from = latest_checkpoint(checkpoints, warn=lambda m: say(m, err=True))
        if resume_from is None and checkpoint_dirs(checkpoints):
            damaged = ", ".join(p.name for _, p in checkpoint_dirs(checkpoints))
            raise UsageError(
                f"no checkpoint in {checkpoints} verifies (damaged: {damaged}); restore them, or start over with "
                "--init-model --overwrite-output-dir"
            )
        if resume_from is None:
            say(f"no checkpoint in {output_dir}: starting a new model")
    if args.init_model and checkpoint_dirs(checkpoints) and not args.overwrite_output_dir and not args.dry_run:
        raise UsageError(
            f"{output_dir} already holds checkpoints; drop --init-model to resume them, choose another "
            "--output-dir, or add --overwrite-output-dir to delete them"
        )

    vocab_size = None
    if tokenizer:
        vocab_size = len(data.load_tokenizer(tokenizer))
    elif (output_dir / "tokenizer").is_dir() and not args.init_model:
        vocab_size = len(data.load_tokenizer(output_dir / "tokenizer"))
    elif args.init_from is None:
        vocab_size = args.vocab_size
    if args.init_from:
        try:
            model_cfg = check_hf_folder(args.init_from)  # config, weight files and their shapes; no tensor is read
        except ValueError as e:
            raise UsageError(f"--init-from {e}") from None
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
        changed = check_resume(args, saved, tokenizer or output_dir / "tokenizer", plan, output_dir)
        if saved["model_config"] != model_cfg.to_dict():
            raise UsageError(model_mismatch(saved, model_cfg, output_dir, tokenizer))
    mix = None if args.dry_run else data.parse_mix(args.dataset, text_column=args.text_column)  # ValueError: bad path
    if mix is not None:
        data.check_local_files(mix)  # empty, binary or non-UTF-8 files, a bad first JSON line: named, before any work
    if geometry is not None and geometry.stages > model_cfg.num_hidden_layers:
        raise UsageError(
            f"{geometry.stages} pipeline stages need at least as many blocks, but the model has "
            f"{model_cfg.num_hidden_layers}; use fewer processes per pipeline (--pipeline-stages) or a deeper model"
        )
    memory = run_memory(args, model_cfg, geometry, world_size)  # bytes per device for the layout being planned
    if not args.dry_run and not args.skip_memory_check:
        check_memory(memory)
    if args.pipeline and not args.dry_run and "RANK" not in os.environ:
        raise UsageError(
            "--pipeline runs one process per stage: launch it with `deepspeed --num_gpus N train.py --pipeline ...` "
            "(or torchrun --nproc_per_node N), or add --dry-run to see its plan"
        )
    if lock is None and not args.dry_run:  # a new output dir: created only now that the start is valid
        lock = take_output_dir(output_dir, held)
    return Run(
        args, plan, geometry, model_cfg, mix, tokenizer, output_dir, resume_from, world_size, memory, lock, changed
    )


def print_plan(run: Run) -> None:
    counts = models.count_parameters(run.model_cfg)
    plan = run.plan.to_dict() | {
        "parameters": counts,
        "model": run.args.model_config or run.args.model,
        "world_size": run.world_size,
        "pipeline": None if run.pipeline is None else run.pipeline.to_dict(),
        "memory": run.memory,
    }
    if run.args.json:
        print(json.dumps(plan))
        return
    print(schedule.format_plan(run.plan))
    if run.pipeline is not None:
        print(schedule.format_pipeline(run.pipeline, run.plan.tokens_per_step))
    print(
        f"model {plan['model']}: {counts['total'] / 1e6:.1f}M parameters "
        f"({counts['non_embedding'] / 1e6:.1f}M without embeddings); world size {run.world_size}"
    )
    print(f"memory (estimate): {format_memory(run.memory)}")


# -----------------------------------------------------------------------------
# The one training loop


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer and data position."""

    step: int = 0
    tokens: int = 0
    lr_factor: float = 1.0  # lowered by each rollback
    rollbacks: int = 0
    run_dir: str | None = None  # the log folder, relative to the output dir


def start_monitoring(run: Run, state: TrainState, is_main: bool, vocab_size: int):
    """The run directory (reused on resume), logs, run info, progress display, job control and stop signals."""
    resuming = state.run_dir is not None and not Path(state.run_dir).is_absolute()
    run_dir = run.output_dir / state.run_dir if resuming else new_run_dir(run.output_dir)
    state.run_dir = str(run_dir.relative_to(run.output_dir))
    logger = RunLogger(run_dir, enabled=is_main, resume_step=state.step if resuming else None)
    info = runinfo.collect(
        args=vars(run.args),
        plan=run.plan.to_dict(),
        model_config=run.model_cfg,
        world_size=run.world_size,
        parameters=models.count_parameters(run.model_cfg),
        data={"dataset": run.args.dataset, "vocab": vocab_size},
    )
    if is_main:
        runinfo.write(run_dir, info)
        if run.args.verbose_info:
            runinfo.show(info)
    say(schedule.format_plan(run.plan))
    bar = Progress(run.plan.total_steps, run.plan.total_train_tokens, enabled=is_main, start_step=state.step)
    control = JobControl(run.output_dir, run.output_dir.name, enabled=is_main)
    return logger, bar, control, steering.StopSignals(), info


def sample_text(model, tokenizer, args: argparse.Namespace, max_new_tokens: int) -> str:
    return samples.generate(
        model,
        tokenizer,
        samples.PROMPTS[0],
        max_new_tokens=max_new_tokens,
        temperature=args.sample_temperature,
        top_k=args.sample_top_k,
        repetition_penalty=args.repetition_penalty,
        device=next(model.parameters()).device,
        seed=args.seed,
    )


def train(run: Run, lay: DataParallel | FullyShardedDataParallel | Pipeline | TorchPipeline) -> int:
    args, plan = run.args, run.plan
    ckpts = Checkpointer(
        run.output_dir / "checkpoints",
        rank=lay.rank,
        barrier=lay.barrier,
        keep=args.save_total_limit,
        warn=lambda m: say(m, err=True),
    )
    state, detector = TrainState(), DivergenceDetector(args.divergence_threshold, warmup_steps=plan.warmup_steps)
    scheduler = schedule.InfiniteLR(lay.optimizer, plan)

    def restore(path: Path, data_too: bool) -> None:
        saved = ckpts.load(path, lay.place)
        lay.load(saved["model_state"], saved["optimizer_state"])
        trainer = saved["trainer_state"]
        for f in fields(TrainState):
            setattr(state, f.name, trainer.get(f.name, getattr(state, f.name)))
        scheduler.lr_factor = state.lr_factor
        scheduler.load_state_dict({"step": state.step})
        detector.load_state_dict(trainer["divergence"])
        if data_too and lay.stream is not None:
            lay.stream.load_state_dict(trainer["data_state"])  # ValueError (exit 2) when the data mix changed
        if saved["rank_state"] is not None and trainer["world_size"] == lay.world:
            restore_rng(saved["rank_state"]["rng"])

    if run.resume_from is not None:
        with bad_input():
            restore(run.resume_from, data_too=not args.no_restore_dataset_state)
        if args.no_restore_dataset_state:
            say("data: --no-restore-dataset-state given, restarting the data from the beginning")
        say(f"resumed from {run.resume_from} at step {state.step:,}")
    batches = lay.start_data()
    if run.resume_changes:
        say(f"resume: changed since the checkpoint: {'; '.join(run.resume_changes)}", err=True)
    lay.barrier()  # every rank has validated its inputs and read its held-out data
    logger, bar, control, signals, info = start_monitoring(run, state, lay.is_main, len(lay.tokenizer))
    meter = Meter(run.model_cfg, plan.tokens_per_step, lay.world, device_peak_flops(lay.device, lay.dtype), lay.device)
    lr_spike = parse_lr_spike(args.inject_lr_spike)
    compile_watch = models.CompileWatch(say, enabled=args.compile)

    def evaluate() -> float:
        metrics = lay.evaluate()  # loss and bits per byte
        loss = metrics["loss"]
        logger.eval(state.step, tokens=state.tokens, **metrics)
        if args.sample_tokens > 0 and math.isfinite(loss):  # never sample from a diverged model
            model = lay.sample_model()
            if model is not None:
                text = sample_text(model, lay.tokenizer, args, args.sample_tokens)
                logger.text("sample", text, state.step)
                bpb = metrics["bits_per_byte"]
                say(f"step {state.step:,} | eval loss {loss:.4f} | {bpb:.4f} bits/byte | sample: {text!r}")
        return loss

    def save(eval_loss: float) -> None:
        if not lay.can_checkpoint:
            return say("this layout cannot save checkpoints; not saved")
        trainer = {
            **asdict(state),
            "eval_loss": eval_loss,
            "divergence": detector.state_dict(),
            "tokenizer_hash": tokenizer_hash(lay.tokenizer),
            "world_size": lay.world,
            "model_name": args.model_config or args.model,
            "model_config": run.model_cfg.to_dict(),
            "plan": plan.to_dict(),
            "args": vars(args),
            "data_state": batches.state_dict() if lay.is_main else None,
            "run_info": info,
            "start_id": start_id,  # tells this start's checkpoints from a replaced run's (monitor/checkpoint.py)
        }
        path, pruned = ckpts.save(
            state.step,
            model_part=lay.model_part(),
            optimizer_part=lay.optimizer_part(),
            trainer_state=trainer if lay.is_main else None,
            rank_state={"rng": capture_rng()},
        )
        say(f"saved {path}" + (f" (removed {len(pruned)} older)" if pruned else ""))
        nonlocal replacing
        if replacing:
            ckpt.drop_replaced(run.output_dir)
            replacing = False

    replacing, start_id = False, secrets.token_hex(8)
    try:
        # Only now replace what the output dir held: the old run is set aside until this run's first checkpoint (or
        # finished export), and put back (finally, below) if this run ends before it.
        if lay.is_main and args.init_model and args.overwrite_output_dir:
            replaced = ["checkpoints", "final"] + (["tokenizer"] if staged_tokenizer(run.output_dir) else [])
            replacing = True  # a second signal inside set_aside still puts back what it had moved
            replacing = ckpt.set_aside(run.output_dir, replaced, start_id)
        if lay.is_main:
            publish_tokenizer(run.output_dir)
        if state.step == 0:
            evaluate()
        exit_code, eval_loss, loss, rollback_floor = 0, None, 0.0, None
        stage, epoch = (batches.current_stage, batches.epoch) if batches is not None else (0, 0)
        while state.step < plan.total_steps:
            step = state.step + 1
            if "factor" in lr_spike and step == lr_spike["step"]:  # testing aid for the divergence guard: applied once
                scheduler.lr_factor *= lr_spike.pop("factor")
                scheduler.load_state_dict(scheduler.state_dict())  # re-apply the LR for this update
            with compile_watch.step(step):  # reports the compile time and warns of recompiles
                loss, grad_norm = lay.train_step(meter)
            scheduler.step()
            state.step, state.tokens = step, state.tokens + plan.tokens_per_step
            meter.add_step(loss)
            last = step == plan.total_steps
            if batches is not None and batches.current_stage != stage:  # a curriculum moved on to its next mix
                stage = batches.current_stage
                logger.event(step, "stage", stage=stage, dataset=args.dataset)
                say(f"step {step:,}: data stage {stage} of {args.dataset}")
            if step % plan.logging_steps == 0 or last:
                drawn = batches.source_counts() if batches is not None else {}  # documents and tokens per source
                per_source = {f"{kind}/{label}": n[kind] for label, n in drawn.items() for kind in ("docs", "tokens")}
                record = logger.train(
                    step, tokens=state.tokens, lr=scheduler.current_lr, grad_norm=grad_norm, **meter.record(),
                    **per_source,
                )  # fmt: skip
                bar.update(step, state.tokens, record or {})

            # Every rank learns, at the same step, what job control, signals and the divergence guard ask for.
            reason = detector.update(step, loss, grad_norm)
            eval_loss = evaluate() if step % plan.eval_steps == 0 or last else None
            if eval_loss is not None:
                reason = reason or detector.update_eval(step, eval_loss)
            wish = control.poll() or ("stop" if signals.requested else None)
            if args.save_strategy == "epoch" and batches is not None and batches.epoch != epoch:  # a pass just ended
                epoch, wish = batches.epoch, wish or "save"
            command = steering.agree(
                steering.divergence_wish(reason, args.divergence_action, wish), lay.device, lay.world
            )
            if command in ("abort", "stop", "rollback") and reason:
                logger.event(step, "divergence", reason=reason, action=command)
                say(f"divergence at step {step:,}: {reason}; action: {command}")
            if command == "rollback":
                # Diverging again before anything new was saved means the checkpoint itself is bad (e.g. finite
                # weights so large that every gradient overflows): go one checkpoint further back each time.
                target = ckpts.latest(before=rollback_floor)
                if target is None or state.rollbacks >= args.max_rollbacks:
                    command = "abort"
                else:
                    rollbacks, lr_factor = state.rollbacks + 1, state.lr_factor * args.rollback_lr_factor
                    restore(target, data_too=False)  # keep the data position: the offending batches are skipped
                    rollback_floor = state.step
                    ckpts.discard_after(state.step)  # a resume must never pick up the abandoned history
                    state.rollbacks, state.lr_factor = rollbacks, lr_factor
                    scheduler.lr_factor = lr_factor
                    scheduler.load_state_dict({"step": state.step})
                    logger.event(state.step, "rollback", to=str(target), lr_factor=lr_factor)
                    say(f"rolled back to {target}; LR factor now {lr_factor:g}")
                    continue
            finite = (
                math.isfinite(loss) and math.isfinite(grad_norm) and (eval_loss is None or math.isfinite(eval_loss))
            )
            due = args.save_strategy != "no" and (
                last or (args.save_strategy == "steps" and step % plan.save_steps == 0)
            )
            wants_save = command in ("save", "stop") or (due and command != "abort")
            if wants_save and finite:
                save(eval_loss if eval_loss is not None else evaluate())
                rollback_floor = None
            elif wants_save:  # the divergence actions act on the last finite state
                say(f"step {step:,}: not saving non-finite weights (loss {loss}, gnorm {grad_norm}, eval {eval_loss})")
            if command in ("stop", "abort"):
                say(f"{command} at step {step:,}; newest checkpoint: {ckpts.latest()}")
                exit_code = 1 if reason else 0
                break
        else:  # the budget is spent: the last step was evaluated and saved above
            if eval_loss is None:  # resumed from a finished run
                eval_loss = evaluate()
            logger.summary(state.step, tokens=state.tokens, loss=eval_loss)
            bar.close()
            model = lay.gather_model()
            export_dir = run.output_dir / "final"
            if model is not None and not math.isfinite(eval_loss):  # --divergence-action none: never export NaNs
                say(f"final eval loss {eval_loss}: not exporting non-finite weights; {export_dir} left as it was")
            elif model is not None:
                summary = models.RunSummary(
                    model_name=args.model_config or args.model,
                    dataset=args.dataset,
                    step=state.step,
                    tokens=state.tokens,
                    eval_loss=eval_loss,
                    max_length=args.max_length,
                )
                with publish_dir(export_dir) as folder:  # the previous export stays whole until this one is
                    models.export_hf(
                        model, run.model_cfg, folder, tokenizer=lay.tokenizer, max_length=args.max_length,
                        summary=summary,
                    )  # fmt: skip
                    if replacing:  # a kill between publishing and dropping: the next start knows the export is new
                        ckpt.mark_export(run.output_dir, start_id, folder / "model.safetensors")
                if replacing:  # finished and exported without a checkpoint (--save-strategy no): the old run goes
                    ckpt.drop_replaced(run.output_dir)
                    replacing = False
                text = sample_text(model, lay.tokenizer, args, max(args.sample_tokens, 32))
                say(f"final eval loss {eval_loss:.4f}\nsample: {text}\nHugging Face model: {export_dir}")
    finally:  # also on a second stop signal or an error: the job is unregistered and the logs are flushed
        try:
            if replacing and ckpt.put_back(run.output_dir, start_id):
                say(f"the run this one replaced is back in {run.output_dir} (this ended before its first checkpoint)")
        except OSError as e:  # e.g. another rank still writing into checkpoints/: the next start names .replaced/
            say(f"warning: the replaced run stays in {run.output_dir / ckpt.REPLACED} ({e})", err=True)
        bar.close()
        logger.close()
        control.close()
        signals.restore()
    lay.close()
    return exit_code


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = None
    previous = {}
    if threading.current_thread() is threading.main_thread():  # until the loop takes over: stop cleanly at once
        previous = {sig: signal.signal(sig, steering.interrupt_at_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = resolve_run(args)
        if args.dry_run:
            print_plan(run)
            return 0
        if not args.pipeline:
            return train(run, FullyShardedDataParallel(run) if fsdp_requested() else DataParallel(run))
        torch_engine = pipeline_engine(run.pipeline, args.pipeline_engine) == "torch"
        return train(run, TorchPipeline(run) if torch_engine else Pipeline(run))
    except (UsageError, data.DataError) as e:  # a DataError can surface mid-run: a bad line deep in a stream
        say(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt as e:  # steering.Interrupted, or a SIGINT delivered while a handler was not installed
        signum = getattr(e, "signum", signal.SIGINT)
        safe = latest_checkpoint(run.output_dir / "checkpoints", warn=lambda m: None) if run else None
        say(f"stopped at once by {e or 'an interrupt'}; newest complete checkpoint: {safe or 'none'}", err=True)
        return 128 + signum
    except Exception:
        traceback.print_exc()
        safe = latest_checkpoint(run.output_dir / "checkpoints", warn=lambda m: None) if run else None
        say(f"error: training failed (traceback above); newest complete checkpoint: {safe or 'none'}", err=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if run is not None and run.lock is not None:
            run.lock.release()


if __name__ == "__main__":
    sys.exit(main())
