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
import contextlib
import json
import math
import os
import secrets
import threading
import traceback
from pathlib import Path

import data
import models
import schedule
from console import UsageError, bad_input, say
from data.tokenizer import tokenizer_hash
from lifecycle import checks, policy
from lifecycle.checkpoint import Checkpointer, DiskFull, latest_checkpoint, run_contents
from lifecycle.checks import TEXT, backend, bounded
from lifecycle.divergence import DivergenceDetector
from lifecycle.jobs import JobControl
from lifecycle.outdir import publish_dir
from lifecycle.replace import Replacement
from lifecycle.staging import publish_tokenizer, staged_tokenizer
from lifecycle.state import RunState
from models.memory import format_memory
from monitor import runinfo, samples, wandb_run
from monitor.watch import Watch
from parallel import (
    PIPELINE_ENGINES,
    DataParallel,
    FullyShardedDataParallel,
    Layout,
    Pipeline,
    Run,
    TorchPipeline,
    format_pipeline,
    fsdp_requested,
    group,
    pipeline_engine,
    pipeline_geometry,
)
from parallel.geometry import pipeline_schedule_name

DEFAULT_MODEL = "deepone-162m"
# Option ranges (lifecycle/checks.py): NaN, infinities and out-of-range values are refused when parsed.
COUNT, COUNT0 = bounded(int, 1), bounded(int, 0)
POSITIVE, NONNEGATIVE = bounded(float, above=0), bounded(float, 0)
STEPS, LENGTH, SEED = bounded(int, 1, sentinel=-1), bounded(int, 2), bounded(int, 0, 2**32 - 1)
VOCAB, FACTOR = bounded(int, 260, 2**31 - 1), bounded(float, high=1, above=0)  # 260: 256 bytes, BOS, EOS
TOKENS, TOKENS0 = bounded(float, high=1e6, above=0), bounded(float, 0, 1e6)  # billions: up to 10^15 tokens
LR, PENALTY = bounded(float, high=10, above=0), bounded(float, 0.01, 100)  # the sqrt-scaled LRs stay finite
TEMPERATURE = bounded(float, 0.01, 100, sentinel=0.0)  # 0 = greedy; below 0.01 the logits overflow
WAIT, CADENCE = bounded(float, 1, 7 * 24 * 3600), bounded(float, high=1e6, above=0)  # seconds; interval scale


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
    g.add_argument("--total-tokens", type=TOKENS, default=3.0, help="training budget in billions of tokens")
    g.add_argument("--max-steps", type=STEPS, default=-1, help="optimizer steps to run; -1 = train to the budget")
    g.add_argument("--batch-size", type=COUNT, default=4, help="sequences per device per micro-step")
    g.add_argument("--gradient-accumulation-steps", type=COUNT, default=1, help="micro-steps per optimizer step")
    g.add_argument("--max-length", type=LENGTH, default=4096, help="tokens per packed sequence")
    g = p.add_argument_group("learning rate")
    g.add_argument("--learning-rate", type=LR, default=1.4e-5, help="peak LR for global batch 1 (scaled by sqrt)")
    g.add_argument("--warmup-steps", type=COUNT0, default=500, help="linear warmup from 0 to the peak LR, in steps")
    g.add_argument("--min-cooldown-tokens", type=TOKENS0, default=100.0, help="min cooldown, billions of tokens")
    g.add_argument("--anneal-steps", type=COUNT0, default=0, help="anneal to min_lr over the last N steps (0 = never)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", type=TEXT, default=DEFAULT_MODEL, help="named config in models/configs/ (e.g. tiny, llama-124m)"
    )
    g.add_argument("--model-config", type=TEXT, default=None, help="path to a model config JSON (overrides --model)")
    g.add_argument(
        "--init-from", type=TEXT, default=None, help="start from a Hugging Face model folder (continued pretraining)"
    )
    g.add_argument(
        "--attn-implementation", default="sdpa", choices=models.ATTN_IMPLEMENTATIONS, help="attention kernel"
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the loss path and the Adafactor step (slow first step)"
    )
    g.add_argument(
        "--no-document-mask", action="store_true", help="train on rows as plain text: attention crosses documents"
    )
    g.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in the backward (less memory)"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset", type=TEXT, default="smollm", help="smollm (Hub), smollm=PATH, builtin (offline), paths or a mix"
    )
    g.add_argument(
        "--text-column", type=TEXT, default="text", help="field holding each document in file and Hub sources"
    )
    g.add_argument("--tokenizer", type=TEXT, default=None, help="tokenizer.json, folder or Hub name (None: train one)")
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
    g.add_argument("--output-dir", type=TEXT, default=None, help="run directory (None: output_models/<model name>)")
    g.add_argument("--overwrite-output-dir", action="store_true", help="with --init-model, delete earlier checkpoints")
    g.add_argument("--save-strategy", default="steps", choices=["no", "steps", "epoch"], help="when to checkpoint")
    g.add_argument("--save-total-limit", type=COUNT, default=4, help="checkpoints kept (always the best 2 by eval)")
    g.add_argument("--step-cadence", type=CADENCE, default=1.0, help="scale the log/eval/save intervals")
    g.add_argument("--sample-tokens", type=COUNT0, default=48, help="tokens per text sample at each eval (0 = none)")
    g.add_argument("--sample-temperature", type=TEMPERATURE, default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument("--sample-top-k", type=COUNT0, default=40, help="sample among the k likeliest tokens (0 = all)")
    g.add_argument("--repetition-penalty", type=PENALTY, default=1.2, help="shrink logits of seen tokens (1 = off)")
    g.add_argument("--wandb", type=wandb_run.project_run, metavar="PROJECT[/RUN]", help="also log to Weights & Biases")
    g = p.add_argument_group("divergence guard")
    g.add_argument(
        "--divergence-action", default="abort", choices=["abort", "stop", "rollback", "none"], help="on a blow-up"
    )
    g.add_argument("--divergence-threshold", type=POSITIVE, default=1.0, help="max nats of fast minus slow loss EMA")
    g.add_argument("--max-rollbacks", type=COUNT0, default=3, help="rollbacks before giving up (abort)")
    g.add_argument("--rollback-lr-factor", type=FACTOR, default=0.5, help="LR multiplier applied at each rollback")
    g.add_argument("--inject-lr-spike", type=TEXT, metavar="STEP,FACTOR", help="testing aid: LR x FACTOR from STEP on")
    g.add_argument("--seed", type=SEED, default=42, help="seed for init, data order and sampling")
    g = p.add_argument_group("distributed")
    g.add_argument(
        "--dist-backend", type=backend, default=None, help="torch.distributed backend (None: nccl on GPU, gloo on CPU)"
    )
    g.add_argument(
        "--dist-timeout", type=WAIT, default=900, help="seconds a collective waits for the other processes (then exit)"
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


def plan_run(args: argparse.Namespace, world_size: int):
    """(the plan, the pipeline geometry or None); a pipeline's global batch is world x batch size too (the spec's)."""
    geometry = None
    if args.pipeline:
        geometry = pipeline_geometry(
            args.pipeline_schedule,
            batch_size=args.batch_size,
            world_size=world_size,
            microbatch_scale=args.microbatch_scale,
            grad_accum=args.gradient_accumulation_steps,
            pipeline_ranks=args.pipeline_stages,
        )
        pipeline_engine(geometry, args.pipeline_engine)  # UsageError: DeepSpeed cannot hold 2 stages per rank
    plan = schedule.make_plan(
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
    return plan, geometry


def resolve_run(args: argparse.Namespace) -> Run:
    """Everything a run needs from the arguments, checked; the output dir's lock is held only by a valid start."""
    with bad_input(), contextlib.ExitStack() as held:
        pipeline_schedule_name(args.pipeline_schedule)  # ValueError naming the choices, with --pipeline or not
        checks.validate_args(args)
        checks.check_eval_memory(args)
        if args.compile and fsdp_requested():
            raise UsageError("--compile is not supported with FSDP yet (untested with sharded blocks); drop --compile")
        models.check_attn_implementation(args.attn_implementation)  # a missing optional kernel fails here
        tokenizer = args.tokenizer
        if args.init_from and not tokenizer and (Path(args.init_from) / "tokenizer.json").is_file():
            tokenizer = args.init_from  # continued pretraining keeps the model's own tokenizer
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        plan, geometry = plan_run(args, world_size)
        output_dir = Path(args.output_dir or Path("output_models") / Path(args.model_config or args.model).stem)
        lock, resume_from = checks.claim_output_dir(args, output_dir, held)
        if args.init_from and resume_from is not None:
            raise UsageError(
                f"--init-from starts a new model, but {output_dir} holds checkpoints this run would resume (and the "
                "checkpoint would win); add --init-model --overwrite-output-dir, or choose another --output-dir"
            )
        model_cfg = checks.model_config(args, tokenizer, output_dir)
        changed = []
        if resume_from is not None:
            saved = json.loads((resume_from / "trainer_state.json").read_text())
            changed = checks.check_resume(args, saved, tokenizer or output_dir / "tokenizer", plan, output_dir)
            if saved["model_config"] != model_cfg.to_dict():
                raise UsageError(checks.model_mismatch(saved, model_cfg, output_dir, tokenizer))
        mix = None if args.dry_run else data.parse_mix(args.dataset, text_column=args.text_column)
        if mix is not None:
            data.check_local_files(mix)  # empty, binary or non-UTF-8 files, a bad first JSON line: before any work
        if geometry is not None and geometry.stages > model_cfg.num_hidden_layers:
            raise UsageError(
                f"{geometry.stages} pipeline stages need at least as many blocks, but the model has "
                f"{model_cfg.num_hidden_layers}; use fewer processes per pipeline (--pipeline-stages) or a deeper model"
            )
        memory = checks.run_memory(args, model_cfg, geometry, world_size)  # bytes per device for this layout
        if not args.dry_run and not args.skip_memory_check:
            checks.check_memory(memory)
        if args.pipeline and not args.dry_run and "RANK" not in os.environ:
            raise UsageError(
                "--pipeline runs one process per stage: launch it with `deepspeed --num_gpus N train.py --pipeline "
                "...` (or torchrun --nproc_per_node N), or add --dry-run to see its plan"
            )
        if lock is None and not args.dry_run:  # a new output dir: created only now that the start is valid
            lock = checks.take_output_dir(output_dir)
        held.pop_all()  # the start is valid: the run keeps its lock
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
        "memory_dtype": checks.planned_dtype(run.args),
    }
    if run.args.json:
        say(json.dumps(plan))
        return
    say(schedule.format_plan(run.plan))
    if run.pipeline is not None:
        say(format_pipeline(run.pipeline, run.plan.tokens_per_step))
    say(
        f"model {plan['model']}: {counts['total'] / 1e6:.1f}M parameters "
        f"({counts['non_embedding'] / 1e6:.1f}M without embeddings); world size {run.world_size}"
    )
    gpu = run.args.dtype == "auto" and checks.device_type() == "cpu"  # planning on a CPU node for GPUs
    which = f"in {plan['memory_dtype']}" + (", the GPU default; --dtype fp32 for a CPU run" if gpu else "")
    say(f"memory (estimate {which}): {format_memory(run.memory)}")


# -----------------------------------------------------------------------------
# The one training loop and what it calls


def evaluate(lay: Layout, watch: Watch, args: argparse.Namespace, step: int, tokens: int) -> float:
    """Held-out loss and bits per byte, logged and printed; a text sample (--sample-tokens) from a finite model."""
    metrics = lay.evaluate()
    loss = metrics["loss"]
    watch.logger.eval(step, tokens=tokens, **metrics)
    line = f"step {step:,} | eval loss {loss:.4f} | {metrics['bits_per_byte']:.4f} bits/byte"
    if args.sample_tokens > 0 and math.isfinite(loss):  # never sample from a diverged model
        model = lay.sample_model()
        if model is not None:
            text = sample_text(model, lay.tokenizer, args, args.sample_tokens)
            watch.logger.text("sample", text, step)
            line += f" | sample: {text!r}"
    say(line)
    return loss


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


def start_state(run: Run, lay: Layout, start_id: str) -> RunState:
    """The run's state: resumed from the newest checkpoint when there is one."""
    args, plan = run.args, run.plan
    checkpoints = Checkpointer(
        run.output_dir / "checkpoints",
        rank=lay.process.rank,
        barrier=lay.barrier,
        keep=args.save_total_limit,
        warn=lambda m: say(m, err=True),
    )
    scheduler = schedule.InfiniteLR(lay.optimizer, plan, spike=schedule.parse_lr_spike(args.inject_lr_spike))
    detector = DivergenceDetector(args.divergence_threshold, warmup_steps=plan.warmup_steps)
    describe = {
        "tokenizer_hash": tokenizer_hash(lay.tokenizer),
        "model_name": args.model_config or args.model,
        "model_config": run.model_cfg.to_dict(),
        "plan": plan.to_dict(),
        "args": vars(args),
        "start_id": start_id,  # tells this start's checkpoints from a replaced run's (lifecycle/replace.py)
    }
    state = RunState(lay, checkpoints, scheduler, detector, describe)
    if run.resume_from is not None:
        with bad_input():
            data_too = not args.no_restore_dataset_state
            run.resume_from = state.resume_newest(run.resume_from, data_too, warn=lambda m: say(m, err=True))
        if args.no_restore_dataset_state:
            say("data: --no-restore-dataset-state given, restarting the data from the beginning")
        say(f"resumed from {run.resume_from} at step {state.train.step:,}")
    with bad_input():  # ValueError (exit 2) when the saved data position does not fit the data mix
        state.batches = lay.start_data(state.data_state)
    if run.resume_changes:
        say(f"resume: changed since the checkpoint: {'; '.join(run.resume_changes)}", err=True)
    lay.barrier()  # every rank has validated its inputs and read its held-out data
    info = runinfo.collect(
        args=vars(args),
        plan=plan.to_dict(),
        model_config=run.model_cfg,
        world_size=run.world_size,
        parameters=models.count_parameters(run.model_cfg),
        data={"dataset": args.dataset, "vocab": len(lay.tokenizer)},
    )
    state.describe["run_info"] = info
    return state


def export_final(run: Run, lay: Layout, state: RunState, eval_loss: float, replacement: Replacement) -> None:
    """The trained model in Hugging Face format in `final/` (published whole), and a closing sample."""
    model = lay.gather_model()
    export_dir = run.output_dir / "final"
    if model is None:
        return
    if not math.isfinite(eval_loss):  # --divergence-action none: never export NaNs
        say(f"final eval loss {eval_loss}: not exporting non-finite weights; {export_dir} left as it was")
        return
    args = run.args
    summary = models.RunSummary(
        model_name=args.model_config or args.model,
        dataset=args.dataset,
        step=state.train.step,
        tokens=state.train.tokens,
        eval_loss=eval_loss,
        max_length=args.max_length,
    )
    with publish_dir(export_dir) as folder:  # the previous export stays whole until this one is
        models.export_hf(
            model, run.model_cfg, folder, tokenizer=lay.tokenizer, max_length=args.max_length, summary=summary
        )
        replacement.exporting(folder / "model.safetensors")  # a kill before done(): the next start knows it is new
    replacement.done()  # finished and exported without a checkpoint (--save-strategy no): the old run goes
    say(f"final eval loss {eval_loss:.4f}")
    if args.sample_tokens > 0:  # 0: no sampling anywhere
        say(f"sample: {sample_text(model, lay.tokenizer, args, max(args.sample_tokens, 32))}")
    say(f"Hugging Face model: {export_dir}")


def train(run: Run, lay: Layout) -> int:
    args, plan, start_id = run.args, run.plan, secrets.token_hex(8)
    state = start_state(run, lay, start_id)
    say(schedule.format_plan(plan))
    watch = Watch(run, state.train.run_dir, state.train.step, lay, state.describe["run_info"], state.batches)
    state.train.run_dir = watch.run_dir
    control = JobControl(run.output_dir, run.output_dir.name, enabled=lay.process.is_main)
    steer = policy.Policy(args, plan, state.detector, control, state.batches, lay.process.device, lay.process.world,
                          watch.logger.event)  # fmt: skip
    compile_watch = models.CompileWatch(say, enabled=args.compile)
    # The old run is set aside only now, and deleted at this run's first checkpoint or export (lifecycle/replace.py).
    replaced = ["checkpoints", "final"] + (["tokenizer"] if staged_tokenizer(run.output_dir) else [])
    replacing = lay.process.is_main and args.init_model and args.overwrite_output_dir
    exit_code, eval_loss = 0, None
    with (
        contextlib.closing(steer),
        contextlib.closing(watch),
        Replacement(run.output_dir, start_id, replaced, replacing) as replacement,
    ):
        if lay.process.is_main:
            publish_tokenizer(run.output_dir)
        if state.train.step == 0:
            evaluate(lay, watch, args, 0, 0)
        while state.train.step < plan.total_steps:
            with compile_watch.step(state.train.step + 1):  # reports the compile time and warns of recompiles
                loss, grad_norm = lay.train_step(watch.meter)
            step = state.advance(plan.tokens_per_step)
            watch.after_step(step, state.train.tokens, loss, grad_norm, state.scheduler.current_lr, state.batches)
            last = step == plan.total_steps
            eval_loss = (
                evaluate(lay, watch, args, step, state.train.tokens) if step % plan.eval_steps == 0 or last else None
            )
            decision = steer.decide(step, loss, grad_norm, eval_loss, state.batches)
            if decision.command == "rollback":
                if target := state.rollback(args.rollback_lr_factor, args.max_rollbacks):
                    watch.logger.event(state.train.step, "rollback", to=str(target), lr_factor=state.train.lr_factor)
                    say(f"rolled back to {target}; LR factor now {state.train.lr_factor:g}")
                    continue
                decision = decision.abort()
            if decision.save:
                state.save(eval_loss if eval_loss is not None else evaluate(lay, watch, args, step, state.train.tokens))
                replacement.done()
            if decision.stop:
                say(f"{decision.command} at step {step:,}; newest checkpoint: {state.checkpoints.latest()}")
                exit_code = decision.exit_code
                break
        else:  # the budget is spent: the last step was evaluated and saved above
            if eval_loss is None:  # resumed from a finished run
                eval_loss = evaluate(lay, watch, args, state.train.step, state.train.tokens)
            watch.logger.summary(state.train.step, tokens=state.train.tokens, loss=eval_loss)
            watch.bar.close()
            export_final(run, lay, state, eval_loss, replacement)
    lay.close()
    return exit_code


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = None
    previous = {}
    if threading.current_thread() is threading.main_thread():  # until the loop takes over: stop cleanly at once
        previous = {sig: signal.signal(sig, policy.interrupt_at_once) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ended(why: str, code: int, then: str = "", here: bool = False) -> int:  # on every node's terminal (or here)
        safe = latest_checkpoint(run.output_dir / "checkpoints", lambda m: None, contents=run_contents) if run else None
        line = f"{why}; newest complete checkpoint: {safe or 'none'}" + (f"; {then}" if then else "")
        if here:
            print(line, file=sys.stderr, flush=True)
        else:
            say(line, err=True, every_node=True)
        return code

    try:
        group.join(args)  # a launched run joins its process group first, so that its ranks agree on the start
        try:
            run, refusal = resolve_run(args), None
        except (UsageError, data.DataError) as e:
            refusal = e
        if refusal := group.first_refusal(refusal):  # a refusal of any rank, on every rank
            raise refusal
        if args.dry_run:
            print_plan(run)
            return 0
        if not args.pipeline:
            return train(run, FullyShardedDataParallel(run) if fsdp_requested() else DataParallel(run))
        torch_engine = pipeline_engine(run.pipeline, args.pipeline_engine) == "torch"
        return train(run, TorchPipeline(run) if torch_engine else Pipeline(run))
    except (UsageError, data.DataError) as e:  # a DataError can surface mid-run: a bad line deep in a stream
        say(f"error: {e}", err=True, every_node=True)
        return 2
    except DiskFull as e:  # a save that found the disk full: its partial checkpoint is already removed
        return ended(f"error: {e.strerror}; free space and resume", 1)
    except KeyboardInterrupt as e:  # policy.Interrupted, or a SIGINT delivered while a handler was not installed
        return ended(f"stopped at once by {e or 'an interrupt'}", 128 + getattr(e, "signum", signal.SIGINT))
    except Exception as e:
        if lost := group.lost_peer(e):  # the same on every survivor: one line per node, resumable by all
            return ended(f"error: {lost}", 1, "to resume, run the same command again on every node")
        traceback.print_exc()  # on the rank that failed, which says so itself
        return ended("error: training failed (traceback above)", 1, here=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if run is not None and run.lock is not None:
            run.lock.release()
        group.leave()


if __name__ == "__main__":
    sys.exit(main())
