"""The training plan and the InfiniteLR schedule, checked against the spec's worked numbers and closed forms."""

import io
import json
import math

import pytest
import torch

from schedule import InfiniteLR, Plan, format_plan, lr_at, make_plan

# (world_size, total_tokens in billions) -> (tokens_per_step, total_steps, min_cooldown_steps, 70% steps, cooldown),
# with the defaults batch 4, max_length 4096, 100B minimum cooldown tokens; computed in exact integer arithmetic.
WORKED = {
    (1, 3): (16384, 183105, 6103515, 128173, 6103515),
    (1, 10): (16384, 610351, 6103515, 427245, 6103515),
    (1, 50): (16384, 3051757, 6103515, 2136229, 6103515),
    (1, 300): (16384, 18310546, 6103515, 12817382, 12817382),
    (4, 3): (65536, 45776, 1525878, 32043, 1525878),
    (4, 10): (65536, 152587, 1525878, 106810, 1525878),
    (4, 50): (65536, 762939, 1525878, 534057, 1525878),
    (4, 300): (65536, 4577636, 1525878, 3204345, 3204345),
    (5, 3): (81920, 36621, 1220703, 25634, 1220703),
    (5, 10): (81920, 122070, 1220703, 85449, 1220703),
    (5, 50): (81920, 610351, 1220703, 427245, 1220703),
    (5, 300): (81920, 3662109, 1220703, 2563476, 2563476),
    (8, 3): (131072, 22888, 762939, 16021, 762939),
    (8, 10): (131072, 76293, 762939, 53405, 762939),
    (8, 50): (131072, 381469, 762939, 267028, 762939),
    (8, 300): (131072, 2288818, 762939, 1602172, 1602172),
}


@pytest.mark.parametrize(("world_size", "billions"), sorted(WORKED))
def test_plan_worked_examples(world_size: int, billions: int) -> None:
    tokens_per_step, total_steps, min_cooldown, ratio_cooldown, cooldown = WORKED[(world_size, billions)]
    plan = make_plan(total_tokens=billions, world_size=world_size)
    assert plan.global_batch_size == 4 * world_size
    assert plan.tokens_per_step == tokens_per_step
    assert plan.budget_steps == plan.total_steps == total_steps
    assert plan.total_train_tokens == total_steps * tokens_per_step <= billions * 10**9
    assert plan.min_cooldown_steps == min_cooldown
    assert plan.cooldown_steps == cooldown == max(min_cooldown, ratio_cooldown)
    assert plan.lr_scale == pytest.approx(math.sqrt(4 * world_size), rel=1e-15)
    assert plan.max_lr == pytest.approx(1.4e-5 * math.sqrt(4 * world_size), rel=1e-12)
    assert plan.constant_lr == pytest.approx(7.5e-6 * math.sqrt(4 * world_size), rel=1e-12)
    assert plan.min_lr == pytest.approx(1.4e-6 * math.sqrt(4 * world_size), rel=1e-12)


def test_plan_spec_statements() -> None:
    """The figures the spec quotes in its prose."""
    four = make_plan(world_size=4)
    assert (four.tokens_per_step, four.total_steps, four.lr_scale) == (65_536, 45_776, 4.0)
    assert four.max_lr == pytest.approx(5.6e-5, rel=1e-12)
    assert 2000 * four.tokens_per_step == pytest.approx(130e6, rel=0.01)  # "2000 steps ~ 130M tokens"
    assert make_plan(world_size=4, total_tokens=10).total_steps == pytest.approx(150_000, rel=0.02)
    assert make_plan(world_size=5).max_lr == pytest.approx(6.3e-5, rel=0.01)  # "-d 0,1,3,4,5 ... ~6.3e-5"
    # A 3B run stays at ~99.6%+ of max_lr to its last step: its cooldown is ~33x longer than the run.
    assert lr_at(four.total_steps, four) / four.max_lr > 0.996


def test_plan_grad_accum_and_max_length() -> None:
    plan = make_plan(batch_size=2, grad_accum=8, world_size=2, max_length=1024, total_tokens=0.5)
    assert plan.global_batch_size == 32
    assert plan.tokens_per_step == 32_768
    assert plan.total_steps == 500_000_000 // 32_768 == 15_258
    assert plan.lr_scale == pytest.approx(math.sqrt(32))


def test_max_steps_overrides_length_not_cooldown() -> None:
    budget = make_plan(world_size=4, min_cooldown_tokens=0)
    capped = make_plan(world_size=4, min_cooldown_tokens=0, max_steps=2000)
    assert capped.total_steps == 2000 and capped.budget_steps == budget.total_steps == 45_776
    assert capped.cooldown_steps == budget.cooldown_steps == 32_043
    assert all(lr_at(s, capped) == lr_at(s, budget) for s in (1, 499, 500, 501, 1999, 2000))
    assert make_plan(max_steps=-1) == make_plan()
    # --max-steps makes a budget smaller than one step acceptable.
    assert make_plan(total_tokens=1e-6, max_steps=10).total_steps == 10


@pytest.mark.parametrize(
    ("batch_size", "grad_accum", "cadence", "expected"),
    [
        (4, 1, 1.0, (25, 250, 5000)),
        (16, 1, 4.0, (25, 250, 5000)),
        (4, 1, 0.25, (6, 63, 1250)),  # 6.25 -> 6; 62.5 rounds half up
        (6, 1, 1.0, (17, 167, 3333)),  # nearest step: 16.7 -> 17
        (8, 1, 1.0, (13, 125, 2500)),  # 12.5 rounds half up
        (4, 64, 1.0, (1, 4, 78)),  # never below 1
        (256, 1, 0.01, (1, 1, 1)),
    ],
)
def test_cadence(batch_size: int, grad_accum: int, cadence: float, expected: tuple[int, int, int]) -> None:
    plan = make_plan(batch_size=batch_size, grad_accum=grad_accum, step_cadence=cadence, max_steps=10)
    assert (plan.logging_steps, plan.eval_steps, plan.save_steps) == expected


def test_learning_rate_option_moves_only_max_lr() -> None:
    plan = make_plan(base_lr=2e-5, world_size=4)
    assert plan.max_lr == pytest.approx(8e-5)
    assert plan.constant_lr == pytest.approx(3e-5) and plan.min_lr == pytest.approx(5.6e-6)


def test_plan_to_dict_and_format() -> None:
    plan = make_plan(world_size=4, max_steps=50_000, anneal_steps=1000)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["tokens_per_step"] == 65_536 and data["total_steps"] == 50_000 and data["max_steps"] == 50_000
    assert data["budget_steps"] == 45_776 and data["anneal_steps"] == 1000
    text = format_plan(plan)
    for fragment in ("65,536", "50,000", "45,776", "5.6e-05", "3e-05", "5.6e-06", "1,525,878", "49,001-50,000"):
        assert fragment in text
    assert len(text.splitlines()) >= 10


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (dict(total_tokens=1e-6, world_size=4), ("--total-tokens 1e-06", "1,000 tokens", "65,536", "--max-steps")),
        (dict(total_tokens=0), ("--total-tokens 0", "> 0", "billions")),
        (dict(total_tokens=-3), ("--total-tokens -3",)),
        (dict(total_tokens=float("nan")), ("--total-tokens nan",)),
        (dict(batch_size=0), ("--batch-size 0", ">= 1")),
        (dict(batch_size=2.5), ("--batch-size 2.5", "integer")),
        (dict(grad_accum=0), ("--gradient-accumulation-steps 0",)),
        (dict(world_size=-1), ("--world-size -1",)),
        (dict(max_length=0), ("--max-length 0",)),
        (dict(base_lr=0), ("--learning-rate 0",)),
        (dict(base_lr=float("inf")), ("--learning-rate inf",)),
        (dict(warmup_steps=-1), ("--warmup-steps -1", "pass 0")),
        (dict(min_cooldown_tokens=-1), ("--min-cooldown-tokens -1", ">= 0")),
        (dict(step_cadence=0), ("--step-cadence 0",)),
        (dict(max_steps=0), ("--max-steps 0", "-1")),
        (dict(max_steps=-5), ("--max-steps -5",)),
        (dict(anneal_steps=-1), ("--anneal-steps -1",)),
        (dict(max_steps=100, anneal_steps=100), ("--anneal-steps 100", "100 steps", "raise --max-steps")),
        (dict(world_size=4, anneal_steps=50_000), ("--anneal-steps 50,000", "45,776")),
    ],
)
def test_bad_input_raises_helpful_value_error(kwargs: dict, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as excinfo:
        make_plan(**kwargs)
    message = str(excinfo.value)
    assert "\n" not in message and ";" in message  # one line: what is wrong; what to change
    for fragment in fragments:
        assert fragment in message


# ---- the LR schedule ----


def small_plan(**overrides) -> Plan:
    """A run of 1,000 steps of 1,000 tokens; 70% of it (700 steps) sets the cooldown; warmup 100."""
    kwargs = dict(total_tokens=1e-6 * 1000, batch_size=1, max_length=1000, warmup_steps=100, min_cooldown_tokens=0)
    kwargs.update(overrides)
    return make_plan(**kwargs)


def test_lr_warmup() -> None:
    plan = small_plan()
    assert plan.total_steps == 1000 and plan.cooldown_steps == 700
    assert lr_at(1, plan) == pytest.approx(plan.max_lr / 100, rel=1e-12) and lr_at(1, plan) > 0
    assert lr_at(50, plan) == pytest.approx(plan.max_lr / 2, rel=1e-12)
    assert lr_at(100, plan) == pytest.approx(plan.max_lr, rel=1e-12)
    with pytest.raises(ValueError):
        lr_at(0, plan)


def test_lr_cooldown_constant() -> None:
    plan = small_plan()
    assert lr_at(101, plan) < plan.max_lr
    assert lr_at(101, plan) == pytest.approx(plan.max_lr, rel=1e-4)
    assert lr_at(100 + 350, plan) == pytest.approx((plan.max_lr + plan.constant_lr) / 2, rel=1e-12)
    assert lr_at(100 + 175, plan) == pytest.approx(
        plan.constant_lr + (plan.max_lr - plan.constant_lr) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12
    )
    assert lr_at(800, plan) == pytest.approx(plan.constant_lr, rel=1e-12)
    for step in (801, 900, 1000, 10**7):
        assert lr_at(step, plan) == plan.constant_lr
    lrs = [lr_at(s, plan) for s in range(100, 801)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_lr_anneal() -> None:
    base = small_plan()
    plan = small_plan(anneal_steps=100)
    assert all(lr_at(s, plan) == lr_at(s, base) for s in (1, 100, 500, 900))
    start = lr_at(900, base)
    assert lr_at(950, plan) == pytest.approx((start + plan.min_lr) / 2, rel=1e-12)
    assert lr_at(1000, plan) == pytest.approx(plan.min_lr, rel=1e-12)
    assert lr_at(5000, plan) == pytest.approx(plan.min_lr, rel=1e-12)
    # Annealing from the middle of the cooldown starts from the LR in force there, not from constant_lr.
    mid = small_plan(anneal_steps=600)
    assert lr_at(401, mid) < lr_at(400, base) and lr_at(401, mid) == pytest.approx(lr_at(400, base), rel=1e-4)
    assert lr_at(1000, mid) == pytest.approx(mid.min_lr, rel=1e-12)


def test_anneal_fork_continues_without_jump() -> None:
    """Train to the budget, then fork with --max-steps S+N --anneal-steps N: the LR goes on from where it was."""
    base = make_plan(world_size=4, min_cooldown_tokens=0)  # cosine reaches constant_lr inside this run
    last = base.total_steps
    fork = make_plan(world_size=4, min_cooldown_tokens=0, max_steps=last + 2000, anneal_steps=2000)
    assert lr_at(last, base) == base.constant_lr
    assert all(lr_at(s, fork) == lr_at(s, base) for s in (1, 500, 20_000, last))
    assert lr_at(last + 1, fork) == pytest.approx(lr_at(last, base), rel=1e-5)
    assert lr_at(last + 2000, fork) == pytest.approx(fork.min_lr, rel=1e-12)


def test_budget_extension_is_continuous() -> None:
    """Resume a 3B-token run with a 10B budget: the schedule goes on from the same step, no jump, no re-warmup."""
    old, new = make_plan(world_size=4, total_tokens=3), make_plan(world_size=4, total_tokens=10)
    step = old.total_steps
    assert lr_at(step, new) == lr_at(step, old)
    assert abs(lr_at(step + 1, new) - lr_at(step, old)) < 1e-6 * old.max_lr

    model = torch.nn.Linear(2, 2)
    scheduler = InfiniteLR(torch.optim.SGD(model.parameters(), lr=0.0), old, last_step=step - 1)
    scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=123.0)
    resumed = InfiniteLR(optimizer, new)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.last_step == step
    assert optimizer.param_groups[0]["lr"] == lr_at(step + 1, new)
    assert abs(optimizer.param_groups[0]["lr"] - scheduler.current_lr) < 1e-6 * old.max_lr


def test_budget_extension_with_ratio_cooldown_follows_new_curve() -> None:
    """When 70% of the budget sets the cooldown, a larger budget stretches it: the LR takes the new curve's value."""
    old, new = small_plan(), small_plan(total_tokens=2e-6 * 1000)
    assert new.cooldown_steps == 1400
    scheduler = InfiniteLR(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.0), new)
    scheduler.load_state_dict({"step": 500})
    assert scheduler.optimizer.param_groups[0]["lr"] == lr_at(501, new) > lr_at(500, old)
    assert lr_at(501, new) < new.max_lr


def test_torch_wrapper_applies_lr_at_each_update() -> None:
    plan = small_plan()
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = InfiniteLR(optimizer, plan)
    assert scheduler.current_lr == lr_at(1, plan)
    total = 0.0
    for step in range(1, 121):
        param.grad = torch.ones(3)
        before = param.detach().clone()
        optimizer.step()
        scheduler.step()
        applied = (before - param.detach())[0].item()
        assert applied == pytest.approx(lr_at(step, plan), rel=1e-5)
        assert scheduler.current_lr == lr_at(step, plan)
        assert scheduler.get_last_lr() == [lr_at(step + 1, plan)]
        total += applied
    assert scheduler.state_dict() == {"step": 120}
    assert total == pytest.approx(sum(lr_at(s, plan) for s in range(1, 121)), rel=1e-4)


def test_lr_spike_multiplies_from_its_update_on_once() -> None:
    """--inject-lr-spike N,F: update N and later run at F x the schedule; the logged LR of N-1 is untouched, a resume
    past N never sees it, and a rollback's new factor replaces it."""
    plan = small_plan()
    param = torch.nn.Parameter(torch.zeros(1))

    def run(scheduler, updates):
        used = []
        for _ in range(updates):
            used.append((scheduler.optimizer.param_groups[0]["lr"], scheduler.current_lr))
            scheduler.step()
        return used

    spiked = run(InfiniteLR(torch.optim.SGD([param], lr=0.0), plan, spike={"step": 4, "factor": 10.0}), 8)
    plain = run(InfiniteLR(torch.optim.SGD([param], lr=0.0), plan), 8)
    for n in range(1, 9):  # update n: (LR it ran with, LR logged after the previous update)
        factor = 10.0 if n >= 4 else 1.0
        assert spiked[n - 1][0] == pytest.approx(plain[n - 1][0] * factor)
        assert spiked[n - 1][1] == pytest.approx(plain[n - 1][1] * (10.0 if n - 1 >= 4 else 1.0))
    resumed = InfiniteLR(torch.optim.SGD([param], lr=0.0), plan, spike={"step": 4, "factor": 10.0})
    resumed.restore(5, 1.0)  # a resume past the spike
    assert run(resumed, 2)[0][0] == pytest.approx(lr_at(6, plan))
    rolled = InfiniteLR(torch.optim.SGD([param], lr=0.0), plan, spike={"step": 4, "factor": 10.0})
    run(rolled, 5)
    rolled.restore(2, 0.5)  # a rollback lowers the factor: the spike is gone with the old one
    assert [lr for lr, _ in run(rolled, 4)] == pytest.approx([lr_at(n, plan) * 0.5 for n in (3, 4, 5, 6)])
