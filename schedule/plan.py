"""The training plan: a token budget and batch geometry turned into steps, learning rates and cadence.

Every derived number of a run is computed here, once, from the command line values, so that `--dry-run` can print
exactly what training will do. The formulas follow the spec:

    global_batch_size = batch_size * grad_accum * world_size          (sequences per optimizer step)
    tokens_per_step   = max_length * global_batch_size
    budget_steps      = total_tokens (billions) // tokens_per_step
    total_steps       = max_steps if given, else budget_steps
    lr_scale          = sqrt(global_batch_size)
    max_lr            = base_lr * lr_scale     constant_lr = 7.5e-6 * lr_scale     min_lr = 1.4e-6 * lr_scale
    cooldown_steps    = max(min_cooldown_tokens // tokens_per_step, int(0.7 * budget_steps))
    logging_steps     = 100 * step_cadence / (batch_size * grad_accum)    (eval: 1000 x, save: 20000 x)

Worked example (defaults on 4 GPUs): 4,096 tokens x 16 sequences = 65,536 tokens per step; 3B tokens give 45,776
steps; the LR scale is sqrt(16) = 4, so max_lr = 5.6e-5.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

from schedule.lr import lr_at

# NOTE: only the peak LR follows --learning-rate. The constant and minimum LRs are fixed per-sequence values in the
# spec (7.5e-6 and 1.4e-6 before scaling), so raising --learning-rate widens the cooldown instead of moving its end.
BASE_CONSTANT_LR = 7.5e-6
BASE_MIN_LR = 1.4e-6
# The cosine cooldown spans 70% of the budget's steps when that is longer than --min-cooldown-tokens.
COOLDOWN_PERCENT = 70
# Event intervals in sequences per device (batch_size x grad_accum), before --step-cadence scaling.
LOGGING_INTERVAL = 100
EVAL_INTERVAL = 1000
SAVE_INTERVAL = 20000


@dataclass(frozen=True)
class Plan:
    """Everything derived from the budget and batch geometry; steps are counts of optimizer updates."""

    # Inputs, as given.
    total_tokens: float  # token budget in billions
    batch_size: int  # sequences per device per micro-step
    grad_accum: int  # micro-steps per optimizer update
    world_size: int  # data-parallel processes
    max_length: int  # tokens per sequence
    base_lr: float  # peak LR for a global batch of one sequence
    warmup_steps: int
    min_cooldown_tokens: float  # billions
    step_cadence: float
    max_steps: int | None  # None: train to the token budget
    anneal_steps: int  # the final steps of the run that anneal to min_lr; 0 = no anneal
    # Batch geometry.
    global_batch_size: int
    tokens_per_step: int
    # Length of the run.
    budget_steps: int  # steps the token budget pays for
    total_steps: int  # steps this run makes: max_steps if given, else budget_steps
    total_train_tokens: int  # total_steps * tokens_per_step
    # Learning rates.
    lr_scale: float
    max_lr: float
    constant_lr: float
    min_lr: float
    # Schedule phases (see schedule/lr.py).
    min_cooldown_steps: int
    cooldown_steps: int
    # Event cadence, in optimizer steps.
    logging_steps: int
    eval_steps: int
    save_steps: int

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (ints, floats and None only)."""
        return asdict(self)


def check_int(value: Any, flag: str, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{flag} {value!r} must be an integer >= {minimum}; {hint}")


def _check_float(value: Any, flag: str, hint: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{flag} {value!r} must be a finite number {bound}; {hint}")


def _cadence(interval: int, step_cadence: float, sequences_per_step: int) -> int:
    # NOTE: rounded half up to the nearest step rather than truncated, so the interval is the step count closest
    # to the intended number of sequences (e.g. 100 / 6 -> 17, not 16); never below 1.
    return max(1, math.floor(interval * step_cadence / sequences_per_step + 0.5))


def _check_inputs(batch_size, grad_accum, world_size, max_length, warmup_steps, anneal_steps, total_tokens, base_lr,
                  min_cooldown_tokens, step_cadence) -> None:  # fmt: skip
    """ValueError naming the first option out of range and what to pass instead."""
    check_int(batch_size, "--batch-size", 1, "pass the number of sequences per device, e.g. --batch-size 4")
    check_int(grad_accum, "--gradient-accumulation-steps", 1, "pass the micro-batches per optimizer step, e.g. 1")
    check_int(world_size, "--world-size", 1, "pass the number of data-parallel processes, e.g. --world-size 4")
    check_int(max_length, "--max-length", 1, "pass the sequence length in tokens, e.g. --max-length 4096")
    check_int(warmup_steps, "--warmup-steps", 0, "pass 0 to disable warmup")
    check_int(anneal_steps, "--anneal-steps", 0, "pass 0 to disable the anneal")
    _check_float(total_tokens, "--total-tokens", "pass the budget in billions of tokens, e.g. --total-tokens 3")
    _check_float(base_lr, "--learning-rate", "pass the peak LR for batch size 1, e.g. --learning-rate 1.4e-5")
    _check_float(min_cooldown_tokens, "--min-cooldown-tokens", "pass billions of tokens, e.g. 100", allow_zero=True)
    _check_float(step_cadence, "--step-cadence", "pass a positive factor, e.g. --step-cadence 1.0")


def make_plan(
    *,
    total_tokens: float = 3.0,
    batch_size: int = 4,
    grad_accum: int = 1,
    world_size: int = 1,
    max_length: int = 4096,
    base_lr: float = 1.4e-5,
    warmup_steps: int = 500,
    min_cooldown_tokens: float = 100.0,
    step_cadence: float = 1.0,
    max_steps: int | None = None,
    anneal_steps: int = 0,
) -> Plan:
    """Resolve the plan for a run; raise ValueError naming the bad option and what to change.

    `max_steps` of None or -1 means "train to the token budget" (train.py's `--max-steps -1` follows this rule). When
    given, it sets the length of the run but not the shape of the LR curve: the cooldown length still comes from the
    token budget, so a `--max-steps` run follows exactly the LR of the full-budget run up to where it stops, and a run
    resumed with `--max-steps S+N --anneal-steps N` anneals from where the first run left off without any jump.
    """
    _check_inputs(batch_size, grad_accum, world_size, max_length, warmup_steps, anneal_steps, total_tokens, base_lr,
                  min_cooldown_tokens, step_cadence)  # fmt: skip
    if max_steps == -1:
        max_steps = None
    if max_steps is not None:
        check_int(max_steps, "--max-steps", 1, "omit it (or pass -1) to train to the --total-tokens budget")

    global_batch_size = batch_size * grad_accum * world_size
    tokens_per_step = max_length * global_batch_size
    # Rounded to whole tokens so that float noise in e.g. 0.3 * 1e9 cannot cost a step.
    budget_tokens = round(total_tokens * 1e9)
    budget_steps = budget_tokens // tokens_per_step
    if budget_steps == 0 and max_steps is None:
        raise ValueError(
            f"--total-tokens {total_tokens:g} ({budget_tokens:,} tokens) is less than one step of "
            f"{tokens_per_step:,} tokens; raise --total-tokens or set --max-steps"
        )
    total_steps = budget_steps if max_steps is None else max_steps
    if anneal_steps >= total_steps:
        raise ValueError(
            f"--anneal-steps {anneal_steps:,} must be smaller than the run's {total_steps:,} steps (it anneals the "
            "final steps of a run); lower --anneal-steps or raise --max-steps / --total-tokens"
        )

    lr_scale = math.sqrt(global_batch_size)
    min_cooldown_steps = round(min_cooldown_tokens * 1e9) // tokens_per_step
    # int(0.7 * budget_steps) in integer arithmetic, so float error cannot cost a step.
    cooldown_steps = max(min_cooldown_steps, budget_steps * COOLDOWN_PERCENT // 100)
    sequences_per_step = batch_size * grad_accum
    return Plan(
        total_tokens=total_tokens,
        batch_size=batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        max_length=max_length,
        base_lr=base_lr,
        warmup_steps=warmup_steps,
        min_cooldown_tokens=min_cooldown_tokens,
        step_cadence=step_cadence,
        max_steps=max_steps,
        anneal_steps=anneal_steps,
        global_batch_size=global_batch_size,
        tokens_per_step=tokens_per_step,
        budget_steps=budget_steps,
        total_steps=total_steps,
        total_train_tokens=total_steps * tokens_per_step,
        lr_scale=lr_scale,
        max_lr=base_lr * lr_scale,
        constant_lr=BASE_CONSTANT_LR * lr_scale,
        min_lr=BASE_MIN_LR * lr_scale,
        min_cooldown_steps=min_cooldown_steps,
        cooldown_steps=cooldown_steps,
        logging_steps=_cadence(LOGGING_INTERVAL, step_cadence, sequences_per_step),
        eval_steps=_cadence(EVAL_INTERVAL, step_cadence, sequences_per_step),
        save_steps=_cadence(SAVE_INTERVAL, step_cadence, sequences_per_step),
    )


def format_plan(plan: Plan) -> str:
    """A readable multi-line table of the plan, as printed by `train.py --dry-run` and at the start of a run."""
    p = plan
    if p.max_steps is None:
        length = f"{p.total_steps:,} steps = {p.total_train_tokens:,} tokens (budget {p.total_tokens:g}B)"
    else:
        length = (
            f"{p.total_steps:,} steps = {p.total_train_tokens:,} tokens "
            f"(--max-steps; the {p.total_tokens:g}B budget is {p.budget_steps:,} steps)"
        )
    cooldown_end = p.warmup_steps + p.cooldown_steps
    source = "--min-cooldown-tokens" if p.cooldown_steps == p.min_cooldown_steps else "70% of the budget"
    if p.anneal_steps:
        anneal_start = p.total_steps - p.anneal_steps + 1
        anneal = f"steps {anneal_start:,}-{p.total_steps:,}: cosine to min_lr"
    else:
        anneal = "off"
    if cooldown_end > p.total_steps:
        cooldown_end_note = f"by step {cooldown_end:,} (after this run ends)"
    else:
        cooldown_end_note = f"by step {cooldown_end:,}, then constant"
    cooldown = f"{p.cooldown_steps:,} steps (set by {source}): cosine to constant_lr {cooldown_end_note}"
    last_lr = lr_at(p.total_steps, p)
    batch = f"{p.global_batch_size:,} sequences = {p.batch_size} per device x {p.grad_accum} accumulation"
    rows = [
        ("global batch", f"{batch} x {p.world_size} processes"),
        ("tokens per step", f"{p.tokens_per_step:,} = {p.global_batch_size:,} x {p.max_length:,} tokens"),
        ("run length", length),
        ("lr scale", f"{p.lr_scale:.4g} = sqrt({p.global_batch_size})"),
        ("max lr", f"{p.max_lr:.4g} (--learning-rate {p.base_lr:g} x {p.lr_scale:.4g})"),
        ("constant lr", f"{p.constant_lr:.4g} ({BASE_CONSTANT_LR:g} x {p.lr_scale:.4g})"),
        ("min lr", f"{p.min_lr:.4g} ({BASE_MIN_LR:g} x {p.lr_scale:.4g})"),
        ("warmup", f"steps 1-{p.warmup_steps:,}: linear to max_lr" if p.warmup_steps else "off"),
        ("cooldown", cooldown),
        ("anneal", anneal),
        ("lr at last step", f"{last_lr:.4g} ({last_lr / p.max_lr:.1%} of max_lr)"),
        ("logging every", f"{p.logging_steps:,} steps"),
        ("eval every", f"{p.eval_steps:,} steps"),
        ("save every", f"{p.save_steps:,} steps"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
