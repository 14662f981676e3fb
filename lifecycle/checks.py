"""Checks of the user's input that need no data and no model: option ranges, the output dir, the jobs dir, memory.

Every check raises UsageError (or argparse's one-line error), so train.py exits 2 with one line before any
expensive work. Option ranges are declared where each option is defined: `type=bounded(int, 1)` parses the value and
refuses NaN, infinities and values out of range at parse time, also under --dry-run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import tempfile
from pathlib import Path

import torch

import data
import schedule
from console import UsageError, say
from data.tokenizer import tokenizer_hash
from lifecycle import checkpoint as ckpt
from lifecycle import replace
from lifecycle.jobs import private_jobs_dir
from lifecycle.outdir import LOCK_NAME, NotOurs, OutputDirBusy, OutputDirLock, check_publishable, recover_published
from models.config import ModelConfig, load_model_config
from models.hf import check_hf_folder
from models.memory import estimate_memory, format_memory

MAX_INT = 2**62
RUN_FOLDERS = ("checkpoints", "runs", "tokenizer", "final")  # what a run writes inside its output dir


def _show(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def TEXT(value: str) -> str:  # noqa: N802 (an argparse type, named like the other option kinds)
    """An argparse `type` for names and paths: an empty one is refused rather than read as the default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; give a value, or leave the option out for its default")
    return value


def bounded(
    kind: type, low: float | None = None, high: float | None = None, *, above: float | None = None, sentinel=None
):
    """An argparse `type`: `kind` (int or float) within [low, high] (or > `above`); `sentinel` is also accepted.

    NaN, +-inf and (for int) anything that is not a whole number are refused with the range in the message.
    """
    parts = [f">= {_show(low)}" if low is not None else "", f"> {_show(above)}" if above is not None else ""]
    parts.append(f"<= {_show(high)}" if high is not None else "")
    bound = " and ".join(p for p in parts if p)
    noun = "an integer" if kind is int else "a finite number"
    wanted = f"{noun} {bound}".strip() + (f" (or {sentinel})" if sentinel is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; expected {wanted}") from None
        if sentinel is not None and value == sentinel:
            return value
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not finite; expected {wanted}")
        too_low = (low is not None and value < low) or (above is not None and value <= above)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {wanted}")
        if kind is int and abs(value) > MAX_INT:  # counts and steps end up in int64 tensors and JSON
            raise argparse.ArgumentTypeError(f"{text} is too large (more than 2^62)")
        return value

    parse.__name__ = kind.__name__
    parse.kind, parse.low, parse.high, parse.above, parse.wanted = kind, low, high, above, wanted  # for tests
    return parse


def backend(text: str) -> str:
    """An argparse `type` for --dist-backend: a torch.distributed backend, or per-device ones ("cpu:gloo,cuda:nccl")."""
    known = [b for b in torch.distributed.Backend.backend_list if b not in ("undefined", "fake")]
    for part in text.split(","):
        name = part.rpartition(":")[2].strip().lower()
        if name not in known:
            raise argparse.ArgumentTypeError(f"{text!r} is not a backend; expected one of {', '.join(known)}")
    return text


def _writable(folder: Path) -> str | None:
    """None when files can be created in `folder`, else why not (permission bits, a read-only file system)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:  # NOTE: os.access says yes to root and to read-only mounts; an anonymous temporary file leaves no trace
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_output_dir(output_dir: Path) -> None:
    """The output dir is a directory (or can be made one) that this process can write, with writable subfolders."""
    try:
        os.stat(output_dir)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"--output-dir {output_dir} is a loop of links; choose another --output-dir") from None
        if output_dir.is_symlink():
            raise UsageError(
                f"--output-dir {output_dir} is a link to nothing ({os.readlink(output_dir)}); make the folder it "
                "points to, or choose another --output-dir"
            ) from None
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} is a file, not a directory; choose another --output-dir")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output-dir {output_dir} cannot be created: {existing} is a file, not a directory")
    for folder in [existing.resolve(), *existing.resolve().parents]:  # a run inside another run's product
        if (folder / "trainer_state.json").is_file() or (folder / ckpt.MARKER).is_file():
            raise UsageError(
                f"--output-dir {output_dir} is inside the checkpoint {folder}, which its run prunes and replaces; "
                "choose a folder of its own"
            )
    for sub in RUN_FOLDERS:
        if (output_dir / sub).exists() and not (output_dir / sub).is_dir():
            raise UsageError(
                f"{output_dir / sub} is a file, but a run keeps a folder there; move it or choose another --output-dir"
            )
    lock = output_dir / LOCK_NAME
    if lock.is_symlink():  # a run would open and truncate whatever it points to
        raise UsageError(f"{lock} is a link, but a run keeps its own lock file there; delete the link and start again")
    if lock.exists() and not lock.is_file():
        raise UsageError(
            f"{lock} is not a file, but a run keeps its lock there; move it or choose another --output-dir"
        )
    folders = [existing] + [output_dir / sub for sub in RUN_FOLDERS if existing == output_dir]
    for folder in folders:
        if folder.is_dir() and (why := _writable(folder)):
            raise UsageError(
                f"--output-dir {output_dir} is not writable ({folder}: {why}); choose another --output-dir"
            )


def check_replaceable(output_dir: Path) -> None:
    """--overwrite-output-dir renames the old run's folders aside (lifecycle/replace.py): none may be a link or a
    mount point, whose files would stay where it points."""
    for name in ("checkpoints", "final", "tokenizer"):
        if (output_dir / name).is_symlink() or os.path.ismount(output_dir / name):
            raise UsageError(
                f"{output_dir / name} is a {'link' if (output_dir / name).is_symlink() else 'mount point'}: "
                "--overwrite-output-dir sets the old run aside by renaming it, which would leave its files "
                "where the link or mount points; delete the old files in it yourself and put an empty folder "
                "(not a link) there, then start again"
            )


def take_output_dir(output_dir: Path) -> OutputDirLock | None:
    """On the main process: hold the output dir's lock for the run's life, and repair what a killed start left.

    A refusal after the lock was taken lets go of it at once (tests start many runs in one process).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        lock = OutputDirLock(output_dir).acquire()
    except OutputDirBusy as e:
        raise UsageError(
            f"{output_dir} is in use by another run ({e}); wait for it, stop it (python -m monitor control "
            "stop JOB), or choose another --output-dir"
        ) from None
    with lock.released_on_error():
        if lock.unsupported:
            say(f"warning: cannot lock {output_dir} ({lock.unsupported}); a second run could share it", err=True)
        try:
            for product in ("final", "tokenizer"):  # a link there would take the run's export elsewhere
                check_publishable(output_dir / product)
                recover_published(output_dir / product)  # an export cut between its two renames
        except NotOurs as e:
            raise UsageError(str(e)) from None
        if problem := replace.settle_replaced(output_dir):  # an --overwrite-output-dir start cut short
            raise UsageError(problem)
        for path in ckpt.clear_staging(output_dir / "checkpoints"):  # saves cut short: their space back
            say(f"removed {path.name}, a checkpoint a crash or a full disk cut short")
    return lock


def claim_output_dir(args: argparse.Namespace, output_dir: Path, stack: contextlib.ExitStack):
    """(the output dir's lock, the checkpoint to resume or None): the output dir checked and locked before anything
    in it is read, so no other run is changing it; the lock goes into `stack` (released if the start is refused)."""
    if args.dry_run:
        return None, None
    check_output_dir(output_dir)  # a file, or a folder this process cannot write: refused before any work
    check_jobs_dir()
    lock = take_output_dir(output_dir) if output_dir.is_dir() else None
    if lock is not None:
        stack.callback(lock.release)
    checkpoints = output_dir / "checkpoints"
    if args.init_model and args.overwrite_output_dir:
        check_replaceable(output_dir)
    if args.init_model and ckpt.checkpoint_dirs(checkpoints) and not args.overwrite_output_dir:
        raise UsageError(
            f"{output_dir} already holds checkpoints; drop --init-model to resume them, choose another "
            "--output-dir, or add --overwrite-output-dir to delete them"
        )
    finished = (output_dir / "final").is_dir() and not ckpt.checkpoint_dirs(checkpoints)
    if finished and args.init_model and not args.overwrite_output_dir:
        raise UsageError(
            f"{output_dir} already holds a finished run (final/); choose another --output-dir, or add "
            "--overwrite-output-dir to replace it"
        )
    resume_from = None
    if not args.init_model:
        resume_from = ckpt.latest_checkpoint(checkpoints, warn=lambda m: say(m, err=True), contents=ckpt.run_contents)
        if resume_from is None and ckpt.checkpoint_dirs(checkpoints):
            damaged = ", ".join(p.name for _, p in ckpt.checkpoint_dirs(checkpoints))
            raise UsageError(
                f"no checkpoint in {checkpoints} verifies (damaged: {damaged}); restore them, or start over with "
                "--init-model --overwrite-output-dir"
            )
        if resume_from is None and finished:
            raise UsageError(
                f"{output_dir} holds a finished run (final/) but no checkpoint to resume; choose another "
                "--output-dir, or train it again with --init-model --overwrite-output-dir"
            )
        if resume_from is None:
            say(f"no checkpoint in {output_dir}: starting a new model")
    return lock, resume_from


def check_jobs_dir() -> None:
    """The job-control directory, when it exists, is private to this user (a run registers there at its start)."""
    try:
        private_jobs_dir()
    except ValueError as e:
        raise UsageError(str(e).rstrip(".")) from None


def available_memory(device: str) -> tuple[int, str]:
    """(bytes, description) of the memory one process may use: the GPU's total, or host RAM shared by local ranks."""
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"{props.name} (cuda:{index})"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // local, "host RAM" + (f" shared by {local} local processes" if local > 1 else "")


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def planned_layout(args: argparse.Namespace, geometry, world_size: int) -> dict:
    """The layout to estimate: a pipeline's stages, FSDP's shards (from Accelerate's environment) or DDP."""
    if geometry is not None:  # GPipe runs every micro-batch forward before any backward; 1F1B at most one per stage
        gpipe = "GPipe" in geometry.schedule
        in_flight = geometry.micro_batches if gpipe else min(geometry.stages, geometry.micro_batches)
        return {
            "layout": "pipeline",
            "stages": geometry.stages,
            "micro_batch": geometry.micro_batch_size,
            "in_flight": in_flight,
        }
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        checkpointing = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() in ("1", "true")
        return {"layout": "fsdp", "world": world_size, "checkpointing": checkpointing}
    return {"layout": "ddp", "world": world_size}


def planned_dtype(args: argparse.Namespace) -> str:
    """The training dtype a plan assumes: --dtype, else this device's default; a --dry-run with --dtype auto plans
    for GPUs (bf16), where real jobs run, even on a CPU login node."""
    if args.dtype != "auto":
        return args.dtype
    return "bf16" if device_type() == "cuda" or args.dry_run else "fp32"


def run_memory(args: argparse.Namespace, cfg: ModelConfig, geometry, world_size: int) -> dict[str, int]:
    """estimate_memory for the run train.py plans, in the precision `planned_dtype` says."""
    layout = planned_layout(args, geometry, world_size)
    bf16 = planned_dtype(args) == "bf16"
    pure_bf16 = bf16 and args.optimizer == "adafactor"
    return estimate_memory(
        cfg,
        micro_batch=layout.get("micro_batch", args.batch_size),
        seq_len=args.max_length,
        optimizer=args.optimizer,
        param_dtype="bf16" if pure_bf16 else "fp32",
        compute_dtype="bf16" if bf16 else None,
        layout=layout["layout"],
        world=layout.get("world", 1),
        stages=layout.get("stages", 1),
        attn_implementation=args.attn_implementation,
        checkpointing=layout.get("checkpointing", False),
        in_flight=layout.get("in_flight"),
    )


def check_eval_memory(args: argparse.Namespace) -> None:
    """The held-out set lives in host memory for the whole run (4 int64 fields per token of every held-out row):
    refuse one larger than half of this process's share of host RAM, before hours of reading it."""
    held_out = args.eval_batches * args.batch_size * args.max_length * 4 * 8
    have, where = available_memory("cpu")
    if held_out > have // 2:
        raise UsageError(
            f"--eval-batches {args.eval_batches:,} keeps {held_out / 2**30:,.1f} GiB of held-out rows in host memory, "
            f"more than half of the {have / 2**30:.1f} GiB of {where}; lower --eval-batches"
        )


def check_memory(estimate: dict[str, int]) -> None:
    """Refuse a run whose estimated memory exceeds what the device (or host) has."""
    try:
        have, where = available_memory(device_type())
    except (RuntimeError, AssertionError, ValueError, OSError):  # no device properties to compare with: no check
        return
    if estimate["total"] > have:
        raise UsageError(
            f"this run needs about {format_memory(estimate)}, more than the {have / 2**30:.1f} GiB of {where}; "
            "lower --batch-size or --max-length (raise --gradient-accumulation-steps to keep the global batch), or "
            "pass --skip-memory-check if the estimate is wrong"
        )


def model_mismatch(saved: dict, cfg: ModelConfig, output_dir: Path, tokenizer: str | None) -> str:
    """Why a checkpoint's model differs from this run's, naming the fields; a vocabulary change is the tokenizer's."""
    now = cfg.to_dict()
    changed = [f"{k} {v} -> {now[k]}" for k, v in saved["model_config"].items() if v != now.get(k)]
    if len(changed) == 1 and changed[0].startswith("vocab_size "):
        was = saved.get("args", {}).get("tokenizer")
        hint = f"pass the run's own --tokenizer {was}" if was and was != tokenizer else "use the run's own tokenizer"
        return (
            f"{output_dir} was trained with a {saved['model_config']['vocab_size']:,}-token vocabulary, but this run's "
            f"tokenizer ({tokenizer or f'--vocab-size {cfg.vocab_size}'}) has {cfg.vocab_size:,}; {hint}"
        )
    return (
        f"{output_dir} holds a different model ({saved['model_name']}: {', '.join(changed)}); use another "
        "--output-dir, or --init-model --overwrite-output-dir to replace it"
    )


# -----------------------------------------------------------------------------
# Checks across options, and what a resume may change


def validate_args(args: argparse.Namespace) -> None:
    """Checks across options (each option's own range is checked when parsed; make_plan checks the budget)."""
    if args.json and not args.dry_run:
        raise UsageError("--json only applies to --dry-run")
    if args.world_size is not None and not args.dry_run:
        raise UsageError("--world-size only applies to --dry-run; launchers set the real world size")
    schedule.parse_lr_spike(args.inject_lr_spike)
    if args.init_from and args.model_config:
        raise UsageError("--init-from starts from that model's own config; drop --model-config (or --init-from)")
    for flag, given in {
        "--pipeline-schedule": args.pipeline_schedule != "1F1B",
        "--microbatch-scale": args.microbatch_scale != 1,
        "--pipeline-engine": args.pipeline_engine is not None,
        "--pipeline-stages": args.pipeline_stages is not None,
    }.items():
        if given and not args.pipeline:
            raise UsageError(f"{flag} only applies to --pipeline; drop it or add --pipeline")
    # NOTE: torch refuses a compiled stage module in the zero-bubble schedules (their split backward), and
    # DeepSpeed's engine does not compile either: one rule for every pipeline.
    for flag, given in {"--compile": args.compile, "--dispatch-batches": args.dispatch_batches}.items():
        if given and args.pipeline:
            raise UsageError(f"{flag} is not supported with --pipeline (either engine); drop it or use DDP")
    if args.compile and args.attn_implementation == "flash_attention_2":
        # NOTE: the varlen kernel takes the cumulative document lengths (one entry per document) and the longest
        # document as a Python int: both change with every batch's packing, so the graph would recompile each step.
        raise UsageError(
            "--compile does not support --attn-implementation flash_attention_2 (its per-batch document lengths "
            "recompile the graph every step): drop --compile, or compile with sdpa"
        )


# Options whose change on resume alters the training from there on: said in one line, not refused.
RESUME_WATCHED = (
    "batch_size", "gradient_accumulation_steps", "max_length", "learning_rate", "warmup_steps", "total_tokens",
    "min_cooldown_tokens", "anneal_steps", "weight_decay", "max_grad_norm", "dtype", "dataset", "no_document_mask",
)  # fmt: skip


def log_folder(output_dir: Path, run_dir: str) -> Path | None:
    """The folder a checkpoint's relative `run_dir` names, when it is `runs/<name>` inside the output dir and no
    link; None when it would lead elsewhere ('../x', a link)."""
    parts, runs = Path(run_dir).parts, output_dir / "runs"
    inside = len(parts) == 2 and parts[0] == "runs" and parts[1] not in (".", "..")
    if not inside or runs.is_symlink() or (output_dir / run_dir).is_symlink():
        return None
    return output_dir / run_dir


def check_run_dir(run_dir: str | None, output_dir: Path) -> None:
    """The log folder a checkpoint names must be `runs/<name>` inside the output dir (logs are appended there and
    truncated to the checkpoint's step): refuse one that leads elsewhere. An absolute one, from older checkpoints,
    is never used (a new log folder is made)."""
    if run_dir is None or Path(run_dir).is_absolute():
        return
    if log_folder(output_dir, run_dir) is None:
        raise UsageError(
            f"the newest checkpoint in {output_dir} names {run_dir!r} as its log folder, which is not a folder under "
            f"{output_dir / 'runs'}/ (an edited or damaged checkpoint); restore it, or start over with --init-model"
        )


def check_resume(args: argparse.Namespace, saved: dict, tokenizer, plan: schedule.Plan, output_dir: Path) -> list[str]:
    """Refuse what cannot continue the saved run (another optimizer, another tokenizer); returns what changed."""
    before = saved.get("args") or {}
    check_run_dir(saved.get("run_dir"), output_dir)
    if before.get("optimizer", args.optimizer) != args.optimizer:
        raise UsageError(
            f"{output_dir} was trained with --optimizer {before['optimizer']}, whose state cannot continue as "
            f"{args.optimizer}; resume with --optimizer {before['optimizer']}, or start over with --init-model"
        )
    trained_with = saved.get("tokenizer_hash") or ((saved.get("data_state") or {}).get("fingerprint") or {}).get(
        "tokenizer"
    )
    if Path(tokenizer) == output_dir / "tokenizer" and not (output_dir / "tokenizer" / "tokenizer.json").is_file():
        # NOTE: a new tokenizer trained here would give the saved embeddings other token ids, silently
        raise UsageError(
            f"{output_dir} has checkpoints but no tokenizer/ (the one they were trained with, copied without it?); "
            "pass that tokenizer with --tokenizer (it is checked against the checkpoint's record)"
        )
    if trained_with:  # runs saved before tokenizer/ was kept have nothing to compare
        now = tokenizer_hash(data.load_tokenizer(tokenizer))
        if now != trained_with and not args.allow_tokenizer_change:
            raise UsageError(
                f"the tokenizer {tokenizer} differs from the one {output_dir} was trained with; resume without "
                "--tokenizer (the run keeps its own in tokenizer/), or add --allow-tokenizer-change to continue "
                "with new token ids"
            )
    changed = [
        f"--{k.replace('_', '-')} {before[k]} -> {getattr(args, k)}"
        for k in RESUME_WATCHED
        if k in before and before[k] != getattr(args, k)
    ]
    if saved.get("world_size") not in (None, plan.world_size):
        changed.append(f"world size {saved['world_size']} -> {plan.world_size}")
    old_lr = (saved.get("plan") or {}).get("max_lr")
    if old_lr is not None and not math.isclose(old_lr, plan.max_lr, rel_tol=1e-9):
        changed.append(f"peak LR {old_lr:.3g} -> {plan.max_lr:.3g}")
    return changed


def model_config(args: argparse.Namespace, tokenizer: str | None, output_dir: Path) -> ModelConfig:
    """The named config (vocabulary from the tokenizer that will be used), or an --init-from model's own."""
    vocab_size = None
    if tokenizer:
        vocab_size = len(data.load_tokenizer(tokenizer))
    elif (output_dir / "tokenizer").is_dir() and not args.init_model:
        vocab_size = len(data.load_tokenizer(output_dir / "tokenizer"))
    elif args.init_from is None:
        vocab_size = args.vocab_size
    if not args.init_from:
        cfg = load_model_config(args.model_config or args.model, vocab_size=vocab_size)
    else:
        try:
            cfg = check_hf_folder(args.init_from)  # config, weight files and their shapes; no tensor is read
        except ValueError as e:
            raise UsageError(f"--init-from {e}") from None
        if vocab_size is not None and vocab_size > cfg.vocab_size:
            raise UsageError(
                f"the tokenizer has {vocab_size:,} tokens but {args.init_from} embeds only "
                f"{cfg.vocab_size:,}; pass the model's own tokenizer with --tokenizer"
            )
    if args.max_length > cfg.max_position_embeddings:
        raise UsageError(
            f"--max-length {args.max_length} is longer than the model supports "
            f"({cfg.max_position_embeddings}); lower --max-length or raise max_position_embeddings"
        )
    return cfg
