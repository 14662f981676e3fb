"""Stochastic rounding, Adafactor against an independent reference, optimizer state round trips, and the builders."""

import io
import math

import pytest
import torch
from torch import nn

from optim import Adafactor, build_optimizer, resolve_dtype, stochastic_round_to_bf16


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 value (from torch's own rounding and nextafter)."""
    nearest = x.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.full_like(nearest, math.inf))
    down = torch.nextafter(nearest, torch.full_like(nearest, -math.inf))
    below = torch.where(nearest.float() <= x, nearest, down)
    above = torch.where(nearest.float() >= x, nearest, up)
    return below.float(), above.float()


# ---- stochastic rounding ----


def test_stochastic_rounding_is_unbiased_and_returns_neighbours() -> None:
    # Values strictly between two bf16 neighbours, at various fractions, signs and magnitudes.
    anchors = torch.tensor([1.0, -2.5, 3.0e-3, 1234.0, -7.0e-20, 0.7], dtype=torch.bfloat16)
    nxt = torch.nextafter(anchors, torch.full_like(anchors, math.inf))
    fractions = torch.tensor([0.3, 0.71, 0.5, 1 / 65536, 0.999, 0.125], dtype=torch.float64)
    values = (anchors.double() + fractions * (nxt.double() - anchors.double())).float()
    below, above = bf16_neighbours(values)
    assert torch.all(below < values) and torch.all(values < above)

    samples = 200_000
    x = values.repeat(samples, 1)  # (samples, 6)
    rounded = stochastic_round_to_bf16(x, 0)
    assert rounded.dtype == torch.bfloat16
    r = rounded.float()
    assert torch.all((r == below) | (r == above))

    p_up = ((values.double() - below.double()) / (above.double() - below.double())).clamp(0, 1)
    sigma = (above.double() - below.double()) * torch.sqrt(p_up * (1 - p_up) / samples)
    error = (r.double().mean(dim=0) - values.double()).abs()
    assert torch.all(error <= 5 * sigma + 1e-30), (error / sigma).tolist()
    # Control: the same 5-sigma check rejects round-to-nearest, whose bias is a fixed fraction of an ulp (all but
    # the 1/65536 column, where nearest is within 5 sigma of the value), so the check above can fail.
    nearest_error = (values.to(torch.bfloat16).double() - values.double()).abs()
    assert torch.all((nearest_error > 5 * sigma)[[0, 1, 2, 4, 5]]), (nearest_error / sigma).tolist()
    # Each neighbour is chosen about as often as its probability says (5 sigma of the binomial count).
    ups = (r == above).sum(dim=0).double()
    assert torch.all((ups - samples * p_up).abs() <= 5 * torch.sqrt(samples * p_up * (1 - p_up)) + 1), ups.tolist()
    assert torch.all(ups[[0, 1, 2, 4, 5]] > 0) and torch.all(ups < samples)  # both neighbours occur


def test_stochastic_rounding_keeps_exact_values_and_specials() -> None:
    exact = torch.randn(10_000, generator=generator(1)).to(torch.bfloat16)
    assert torch.equal(stochastic_round_to_bf16(exact.float(), 2), exact)
    specials = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0]).repeat(1000)
    out = stochastic_round_to_bf16(specials, 3).float()
    assert torch.isnan(out[0::6]).all() and torch.isnan(out[1::6]).all()
    assert (out[2::6] == math.inf).all() and (out[3::6] == -math.inf).all()
    assert (out[4::6] == 0).all() and (out[5::6] == 0).all()
    with pytest.raises(TypeError):
        stochastic_round_to_bf16(exact, 0)


def test_stochastic_rounding_is_deterministic_given_the_key() -> None:
    x = torch.randn(4096, generator=generator(4))
    a = stochastic_round_to_bf16(x, 7)
    b = stochastic_round_to_bf16(x, 7)
    c = stochastic_round_to_bf16(x, 8)
    assert torch.equal(a, b)
    # Control: another key rounds a large share of the elements the other way, each still to a neighbour of x.
    below, above = bf16_neighbours(x)
    assert torch.all((c.float() == below) | (c.float() == above))
    assert (a != c).sum().item() > len(x) // 10


def test_rounding_noise_is_uniform_16_bit_and_keyed_per_slice() -> None:
    from optim.adafactor import rounding_key, rounding_noise

    keys = torch.tensor([rounding_key(42, step, index) for step, index in ((1, 1), (1, 2), (2, 1))])
    noise = rounding_noise(keys, torch.Size([256, 256]))
    assert noise.dtype == torch.int32 and noise.shape == (3, 256, 256)
    assert int(noise.min()) >= 0 and int(noise.max()) < 1 << 16
    counts = torch.bincount((noise[0].flatten() >> 12).long(), minlength=16).double()  # 16 buckets of 4,096 each
    assert ((counts - 4096).abs() <= 5 * math.sqrt(4096 * 15 / 16)).all(), counts.tolist()
    # Another step or another parameter index gives other bits; the same key the same bits.
    assert (noise[0] != noise[1]).float().mean() > 0.99 and (noise[0] != noise[2]).float().mean() > 0.99
    assert torch.equal(rounding_noise(keys[:1], torch.Size([256, 256]))[0], noise[0])


# ---- Adafactor against an independent reference ----


def reference_adafactor(
    params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, weight_decay: float
) -> tuple[list[torch.Tensor], int]:
    """Adafactor written from the paper's formulas in float64: row/column SUMS, V = R C^T / (1^T R).

    Returns the parameters after every step's gradients and how many updates were clipped.
    """
    params = [p.double().clone() for p in params]
    stats: list[tuple[torch.Tensor, ...]] = [() for _ in params]
    clipped = 0
    for t, step_grads in enumerate(grads, start=1):
        beta2 = min(1 - t**-0.8, 0.999)
        for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            g = g.double()
            if g.dim() >= 2:
                g2 = g.reshape(-1, g.shape[-1])
                sq = g2 * g2 + 1e-30
                row_sum, col_sum = sq.sum(dim=1), sq.sum(dim=0)
                if t > 1:
                    row_sum = beta2 * stats[i][0] + (1 - beta2) * row_sum
                    col_sum = beta2 * stats[i][1] + (1 - beta2) * col_sum
                stats[i] = (row_sum, col_sum)
                v = torch.outer(row_sum, col_sum) / row_sum.sum()
                u = (g2 / v.sqrt()).reshape(g.shape)
            else:
                v = g * g + 1e-30
                if t > 1:
                    v = beta2 * stats[i][0] + (1 - beta2) * v
                stats[i] = (v,)
                u = g / v.sqrt()
            rms = u.pow(2).mean().sqrt().item()
            if rms > 1.0:
                clipped += 1
                u = u / rms
            params[i] = p - lr * weight_decay * p - lr * u
    return params, clipped


def test_adafactor_matches_reference_fp32() -> None:
    g = generator(10)
    shapes = [(5, 7), (2, 3, 4), (6,), (1, 9)]
    initial = [torch.randn(shape, generator=g) for shape in shapes]
    # Gradients of varying scale per step, so the running statistics (not just the last gradient) matter.
    grads = [[torch.randn(shape, generator=g) * (1 + 3 * (t % 3)) for shape in shapes] for t in range(6)]
    lr, weight_decay = 0.01, 0.05

    params = [nn.Parameter(p.clone()) for p in initial]
    optimizer = Adafactor(params, lr, weight_decay=weight_decay)
    for step_grads in grads:
        for p, grad in zip(params, step_grads, strict=True):
            p.grad = grad.clone()
        optimizer.step()

    expected, clipped = reference_adafactor(initial, grads, lr, weight_decay)
    assert clipped > 0  # the clipping branch was exercised
    for p, ref in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p.detach().double(), torch.zeros_like(ref))
    # The first step's statistic is the squared gradient itself (beta2_1 = 0).
    fresh = nn.Parameter(torch.zeros(6))
    fresh.grad = grads[0][2].clone()
    single = Adafactor([fresh], lr)
    single.step()
    torch.testing.assert_close(single.state[fresh]["sq"], grads[0][2] ** 2, rtol=1e-6, atol=0)


# (name, weight dtype, stochastic rounding)
VARIANTS = (("fp32", torch.float32, False), ("rtn", torch.bfloat16, False), ("sr", torch.bfloat16, True))


def test_adafactor_bf16_rounds_the_fp32_result() -> None:
    g = generator(11)
    start = torch.randn(16, 8, generator=g).to(torch.bfloat16)
    grad = torch.randn(16, 8, generator=g)
    results = {}
    for name, dtype, sr in VARIANTS:
        p = nn.Parameter(start.to(dtype, copy=True))
        p.grad = grad.to(dtype)
        Adafactor([p], 0.05, stochastic_rounding=sr).step()
        results[name] = p.detach()
    # bf16 gradients differ from fp32 ones, so compare against the fp32 step from the same bf16 gradient.
    p = nn.Parameter(start.float())
    p.grad = grad.to(torch.bfloat16).float()
    Adafactor([p], 0.05).step()
    exact = p.detach()
    assert results["rtn"].dtype == results["sr"].dtype == torch.bfloat16
    assert torch.equal(results["rtn"], exact.to(torch.bfloat16))
    below, above = bf16_neighbours(exact)
    sr = results["sr"].float()
    assert torch.all((sr == below) | (sr == above))
    # Stochastic, with the right probabilities: element i leaves its nearest neighbour with probability q_i (its
    # distance to the nearest over the spacing), so the count of such elements is within 5 sigma of sum(q_i).
    # Round-to-nearest (the control) has a count of 0, which that bound excludes.
    nearest = results["rtn"].float()
    q = ((exact.double() - nearest.double()).abs() / (above.double() - below.double())).clamp(0, 1)
    expected, sigma = q.sum().item(), (q * (1 - q)).sum().sqrt().item()
    flipped = (sr != nearest).sum().item()
    assert expected > 5 * sigma and abs(flipped - expected) <= 5 * sigma, (flipped, expected, sigma)


def test_stochastic_rounding_makes_progress_where_round_to_nearest_stalls() -> None:
    """Updates of 1e-4 on weights of 1.0 (bf16 spacing 2^-8 below 1): SR tracks fp32 in expectation, RTN freezes."""
    steps, lr = 200, 1e-4
    finals = {}
    runs = [(name, dtype, sr, 5) for name, dtype, sr in VARIANTS] + [("sr-seed-6", torch.bfloat16, True, 6)]
    for name, dtype, sr, seed in runs:
        p = nn.Parameter(torch.ones(4096, dtype=dtype))
        optimizer = Adafactor([p], lr, weight_decay=0.0, stochastic_rounding=sr, seed=seed)
        for _ in range(steps):
            p.grad = torch.ones_like(p)  # constant gradient: every update is exactly -lr
            optimizer.step()
        finals[name] = p.detach().float()
    assert finals["fp32"].mean().item() == pytest.approx(1 - steps * lr, abs=1e-5)
    assert torch.all(finals["rtn"] == 1.0)
    # Per-step rounding noise has std <= ulp/2 = 2^-9, so the mean over 4,096 weights after 200 steps has
    # std <= 2^-9 * sqrt(200 / 4096) ~ 4.3e-4; 5 sigma is ~2.2e-3, well below the 2e-2 of progress.
    for name in ("sr", "sr-seed-6"):
        assert abs(finals[name].mean().item() - (1 - steps * lr)) < 2.2e-3
    # Every weight saw the same updates, so only independent per-element rounding spreads them over several bf16
    # values; one shared random draw per step would keep them all equal and could pass the mean check by luck.
    assert finals["sr"].unique().numel() > 1
    # Control: another seed takes other rounding decisions on the way to the same mean.
    assert not torch.equal(finals["sr"], finals["sr-seed-6"])


# ---- state round trip ----


def make_params() -> list[nn.Parameter]:
    g = generator(12)
    return [
        nn.Parameter(torch.randn(8, 16, generator=g).to(torch.bfloat16)),
        nn.Parameter(torch.randn(16, generator=g).to(torch.bfloat16)),
        nn.Parameter(torch.randn(2, 3, 4, generator=g)),
    ]


def train(params: list[nn.Parameter], optimizer: Adafactor, steps: range) -> None:
    for step in steps:
        g = generator(100 + step)  # the gradients depend only on the step number
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        optimizer.step()


def test_adafactor_state_survives_save_and_load_bit_exactly() -> None:
    uninterrupted = make_params()
    optimizer = Adafactor(uninterrupted, 1e-3, seed=3)
    train(uninterrupted, optimizer, range(6))

    first = make_params()
    optimizer = Adafactor(first, 1e-3, seed=3)
    train(first, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved = [p.detach().clone() for p in first]

    def resume(seed: int) -> list[nn.Parameter]:
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        params = [nn.Parameter(t.clone()) for t in saved]
        resumed = Adafactor(params, 1e-3, seed=seed)
        resumed.load_state_dict(state)
        assert all(v.dtype == torch.float32 for s in resumed.state.values() for v in s.values() if torch.is_tensor(v))
        train(params, resumed, range(3, 6))
        return params

    for a, b in zip(resume(seed=3), uninterrupted, strict=True):  # the rounding resumes from the step alone
        assert a.dtype == b.dtype and torch.equal(a, b)
    # Control: other rounding bits after the resume give other weights, so the check above has teeth.
    assert not all(torch.equal(a, b) for a, b in zip(resume(seed=4), uninterrupted, strict=True))


def test_replicas_with_the_same_seed_stay_identical() -> None:
    a, b, other = make_params(), make_params(), make_params()
    train(a, Adafactor(a, 1e-3, seed=9), range(4))
    train(b, Adafactor(b, 1e-3, seed=9), range(4))
    train(other, Adafactor(other, 1e-3, seed=10), range(4))
    assert [x.dtype for x in a] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Control: a different seed gives different bf16 weights, so the equality above is not because the seed is
    # ignored or the rounding is deterministic; fp32 weights are never rounded and do not depend on the seed.
    assert not torch.equal(a[0], other[0]) and not torch.equal(a[1], other[1])
    assert torch.equal(a[2], other[2])


# ---- builders ----


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.embed.weight  # tied


def test_build_optimizer_groups() -> None:
    model = TinyModel()
    for name in ("adafactor", "adamw"):
        optimizer = build_optimizer(name, model, 1e-3, weight_decay=0.1)
        decay, no_decay = optimizer.param_groups
        assert [p is model.embed.weight for p in decay["params"]] == [True]  # tied weight listed once
        assert {id(p) for p in no_decay["params"]} == {id(model.norm.weight), id(model.norm.bias), id(model.head.bias)}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    adamw = build_optimizer("adamw", model, 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["eps"] == 1e-8
    assert not adamw.param_groups[0]["fused"]  # parameters on CPU
    adafactor = build_optimizer("adafactor", model, 1e-3, stochastic_rounding=False)
    assert isinstance(adafactor, Adafactor) and adafactor.param_groups[0]["stochastic_rounding"] is False
    with pytest.raises(ValueError, match="adafactor, adamw or muon"):
        build_optimizer("sgd", model, 1e-3)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        resolve_dtype("fp16", "cpu")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", "cuda") == torch.bfloat16


# ---- the grouped step: compiled equals eager, and both equal the per-parameter algorithm ----


def per_parameter_adafactor(params: list[nn.Parameter], lr: float, step: int, stats: list[dict]) -> None:
    """The per-parameter loop this optimizer ran before its step was grouped (round to nearest), as the oracle."""
    beta2_t = min(1.0 - step**-0.8, 0.999)
    for p, state in zip(params, stats, strict=True):
        grad = p.grad.float()
        grad_sq = grad.square().add_(1e-30)
        if grad.dim() >= 2:
            grad_2d, grad_sq = grad.reshape(-1, grad.shape[-1]), grad_sq.reshape(-1, grad.shape[-1])
            row = state.setdefault("row", torch.zeros(grad_2d.shape[0]))
            col = state.setdefault("col", torch.zeros(grad_2d.shape[1]))
            row.mul_(beta2_t).add_(grad_sq.mean(dim=1), alpha=1.0 - beta2_t)
            col.mul_(beta2_t).add_(grad_sq.mean(dim=0), alpha=1.0 - beta2_t)
            update = (grad_2d * (row / row.mean()).rsqrt_().unsqueeze(1) * col.rsqrt().unsqueeze(0)).reshape(grad.shape)
        else:
            sq = state.setdefault("sq", torch.zeros_like(grad))
            sq.mul_(beta2_t).add_(grad_sq, alpha=1.0 - beta2_t)
            update = grad * sq.rsqrt()
        update.div_((update.square().mean().sqrt() / 1.0).clamp_(min=1.0))
        with torch.no_grad():
            p.copy_(p.float().mul_(1.0 - lr * 0.01).add_(update, alpha=-lr))


def _mixed_params(seed: int) -> list[nn.Parameter]:
    g = generator(seed)
    shapes = [(64, 32), (64, 32), (32, 64), (32,), (32,), (100, 32), (4, 8, 16)]
    return [nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in shapes]


def _set_grads(*param_lists: list[nn.Parameter], step: int) -> None:
    g = generator(1000 + step)
    for ps in zip(*param_lists, strict=True):
        grad = torch.randn(ps[0].shape, generator=g)
        for p in ps:
            p.grad = grad.to(p.dtype)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_form_of_the_step_equals_the_per_parameter_algorithm(dtype, grouped) -> None:
    """Today's step (per parameter on a CPU, stacked by shape on a GPU) against the loop it replaced."""
    mine, reference = _mixed_params(3), _mixed_params(3)
    for p in (*mine, *reference):
        p.data = p.data.to(dtype)
    optimizer = Adafactor(mine, 1e-2, stochastic_rounding=False, grouped=grouped)
    stats = [{} for _ in reference]
    for step in range(1, 7):
        _set_grads(mine, reference, step=step)
        optimizer.step()
        per_parameter_adafactor(reference, 1e-2, step, stats)
    for a, b in zip(mine, reference, strict=True):
        if dtype == torch.float32:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        else:  # fp32 noise in the update may flip a rounding to nearest, by one bf16 ulp, on a few elements
            assert (a != b).float().mean() < 1e-3 and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=0)


@pytest.mark.slow
def test_compiled_step_equals_eager_bit_for_bit_and_never_recompiles_for_a_new_lr() -> None:
    import models

    eager, compiled, stacked, both = (_mixed_params(5) for _ in range(4))
    optimizers = (
        Adafactor(eager, 1e-2, seed=9),  # per parameter (a CPU without --compile)
        Adafactor(compiled, 1e-2, seed=9, compiled=True),  # per parameter, in place (a CPU with --compile)
        Adafactor(stacked, 1e-2, seed=9, grouped=True),  # a GPU without --compile
        Adafactor(both, 1e-2, seed=9, grouped=True, compiled=True),  # a GPU with --compile
    )
    graphs = None
    for step in range(1, 11):
        _set_grads(eager, compiled, stacked, both, step=step)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 * step  # a new LR at every step, as the schedule sets it
            optimizer.step()
        for other in (compiled, stacked, both):  # the same update and the same rounding bits
            assert all(torch.equal(a, b) for a, b in zip(eager, other, strict=True)), step
        graphs = graphs or models.compiled_graphs()
        assert models.compiled_graphs() == graphs, f"recompiled at step {step}"
    assert graphs >= 1  # the compiled form ran


@pytest.mark.slow
def test_compiled_step_compiles_every_shape_of_a_model_with_many() -> None:
    """More distinct shapes than torch's recompile limit (8): every one still runs compiled, none falls back."""
    from torch._dynamo import config as dynamo_config

    import models

    shapes = [(8 + i, 16) for i in range(dynamo_config.recompile_limit + 3)]
    g = generator(2)
    params = [nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in shapes]
    optimizer = Adafactor(params, 1e-2, compiled=True)
    before = models.compiled_graphs()
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
    optimizer.step()
    assert models.compiled_graphs() - before == len(shapes)


# ---- the global gradient norm: accurate on a real-size embedding, the same rule in every layout ----


def test_global_norm_of_a_real_size_embedding_equals_the_float64_norm() -> None:
    """A tied 49,152 x 128 embedding's gradient (a few rows large, the head's share everywhere): the norm every layout
    clips with is the float64 norm within 1e-7 relative, where torch's clip_grad_norm_ (fp32 vector_norm on a CPU,
    what one process used) is off by more than 1e-4 and so disagreed with the pipelines by 5.5e-5."""
    from optim.clipping import clip_, global_norm

    g = generator(4)
    grads = [
        torch.randn(49152, 128, generator=g) * 1e-5,
        torch.randn(384, 128, generator=g) * 1e-4,
        torch.randn(128) * 1e-3,
    ]
    grads[0][:3000] += torch.randn(3000, 128, generator=g) * 1e-3
    exact = math.sqrt(sum(t.double().square().sum().item() for t in grads))
    norm = global_norm(grads)
    assert norm.dtype == torch.float32 and abs(norm.item() - exact) / exact < 1e-7
    params = [nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads, strict=True):
        p.grad = t.clone()
    assert abs(torch.nn.utils.clip_grad_norm_(params, math.inf).item() - exact) / exact > 1e-4  # the old rule
    # clipping: to max_norm exactly, in place, on fp32 and bf16 gradients alike; inf and 0 leave them alone
    mixed = [t.clone() for t in grads[1:]] + [grads[2].to(torch.bfloat16)]
    before = [t.clone() for t in mixed]
    clip_(mixed, math.inf, global_norm(mixed))
    clip_(mixed, 0.0, global_norm(mixed))
    assert all(torch.equal(a, b) for a, b in zip(mixed, before, strict=True))
    clip_(mixed, 0.01, global_norm(mixed))
    assert global_norm(mixed).item() == pytest.approx(0.01, rel=1e-2)  # the bf16 tensor rounds
    assert mixed[-1].dtype == torch.bfloat16
