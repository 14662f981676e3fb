"""--optimizer muon: torch.optim.Muon on the hidden matrices, AdamW on the rest, resumed and scaled out exactly."""

from __future__ import annotations

import copy
import shutil
import socket

import pytest
import torch

import models
from optim.optimizers import (
    MuonAdamW,
    build_optimizer,
    is_muon_parameter,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)
from tests.helpers import train_losses
from tests.test_distributed import ACCELERATE, DEEPSPEED, MAX_NORM, ONE, TWO, grad_norms, run, setup  # noqa: F401

MUON = ["--optimizer", "muon"]


def free_port() -> int:
    """A port nobody listens on now: parallel test sessions on one machine must not share the default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(**overrides) -> models.Transformer:
    cfg = models.load_model_config("tiny", vocab_size=64)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = models.Transformer(cfg)
    model.init_weights()
    return model


def test_hidden_matrices_go_to_muon_and_the_rest_to_adamw() -> None:
    for tied in (True, False):
        model = tiny_model(tie_word_embeddings=tied)
        optimizer = build_optimizer("muon", model, 1e-3, weight_decay=0.1)
        assert isinstance(optimizer, MuonAdamW)
        muon, decay, no_decay = optimizer.param_groups
        named = dict(model.named_parameters())
        projections = {
            f"layers.{i}.{m}.weight"
            for i in range(model.cfg.num_hidden_layers)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        }  # fmt: skip
        name_of = {p: n for n, p in named.items()}
        assert muon["muon"] and {name_of[p] for p in muon["params"]} == projections
        head = {"embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
        assert not decay["muon"] and {name_of[p] for p in decay["params"]} == head
        assert {name_of[p] for p in no_decay["params"]} == {n for n, p in named.items() if p.dim() == 1}
        assert (muon["weight_decay"], decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.1, 0.0)
        assert len(muon["params"]) + len(decay["params"]) + len(no_decay["params"]) == len(named)
    # a pipeline stage names its parameters by layer index; the same matrices are found
    assert is_muon_parameter("3.self_attn.q_proj.weight", torch.zeros(2, 2))
    assert not is_muon_parameter("tied_modules.embed.embed_tokens.weight", torch.zeros(2, 2))
    assert not is_muon_parameter("3.self_attn.q_norm.weight", torch.zeros(2))


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def step(model, optimizer, seed: int) -> float:
    x = batch(seed)
    loss = model(x, labels=x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def test_one_optimizer_equals_muon_and_adamw_side_by_side() -> None:
    """The combined optimizer takes exactly the steps of torch's Muon and AdamW run separately on the same split."""
    model = tiny_model()
    oracle = copy.deepcopy(model)
    combined = build_optimizer("muon", model, 2e-3, weight_decay=0.1)
    muon_group, *adamw_groups = combined.param_groups
    index = {p: i for i, p in enumerate(model.parameters())}
    oracle_params = list(oracle.parameters())
    muon = torch.optim.Muon(
        [oracle_params[index[p]] for p in muon_group["params"]], lr=2e-3, weight_decay=0.1,
        adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    adamw = torch.optim.AdamW(
        [{"params": [oracle_params[index[p]] for p in g["params"]], "weight_decay": g["weight_decay"]}
         for g in adamw_groups],
        lr=2e-3, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    for seed in range(4):
        x = batch(seed)
        oracle(x, labels=x).backward()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
        step(model, combined, seed)
    for (name, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(model.layers[0].self_attn.q_proj.weight, tiny_model().layers[0].self_attn.q_proj.weight)


def test_state_by_name_resumes_bit_exactly() -> None:
    """3 steps, save by name, rebuild everything, load, 3 more steps == 6 uninterrupted steps (in process)."""
    model = tiny_model()
    optimizer = build_optimizer("muon", model, 2e-3)
    uninterrupted = [step(model, optimizer, seed) for seed in range(6)]

    model = tiny_model()
    optimizer = build_optimizer("muon", model, 2e-3)
    first = [step(model, optimizer, seed) for seed in range(3)]
    saved_weights = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer_state_by_name(optimizer, {p: n for n, p in model.named_parameters()}))
    assert set(saved["state"]["layers.1.mlp.up_proj.weight"]) == {"momentum_buffer"}
    assert set(saved["state"]["embed_tokens.weight"]) == {"step", "exp_avg", "exp_avg_sq"}

    model = tiny_model()
    model.load_state_dict(saved_weights)
    optimizer = build_optimizer("muon", model, 2e-3)
    load_optimizer_state_by_name(optimizer, saved, {p: n for n, p in model.named_parameters()})
    assert optimizer._muon.state is optimizer.state and optimizer._adamw.param_groups[0] is optimizer.param_groups[1]
    resumed = first + [step(model, optimizer, seed) for seed in range(3, 6)]
    assert resumed == uninterrupted


def test_fsdp_sharded_parameters_are_refused(tmp_path) -> None:
    """FSDP2 (fully_shard) turns parameters into DTensors: Muon refuses them in one line instead of misbehaving."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = tiny_model()
        fully_shard(model)
        with pytest.raises(ValueError, match="cannot run on FSDP-sharded parameters"):
            build_optimizer("muon", model, 1e-3)
        build_optimizer("adamw", model, 1e-3)  # the others accept them
    finally:
        dist.destroy_process_group()


# ---- end to end: train.py, one process, DDP and the pipeline ----


@pytest.fixture(scope="module")
def muon_reference(setup):  # noqa: F811
    return run(setup, "muon-ref", *MUON, *ONE, "--max-steps", "6")


def test_train_py_resume_is_bit_identical(setup, muon_reference):  # noqa: F811
    split = run(setup, "muon-split", *MUON, *ONE, "--max-steps", "3")
    shutil.rmtree(split / "final")
    run(setup, "muon-split", *MUON, *ONE, "--max-steps", "6", fresh=False)
    uninterrupted, resumed = train_losses(muon_reference), train_losses(split)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == uninterrupted
    adamw = run(setup, "adamw-ref", *ONE, "--max-steps", "6")  # the helper's default optimizer
    assert train_losses(adamw)[6] != uninterrupted[6]  # muon really was the update rule


def assert_close_run(layout, single) -> None:
    """Losses within 2e-4 and grad norms within 1e-3 relative of the single process, clipping active every step.

    NOTE: looser than AdamW's 1e-5 (tests/test_distributed.py) on purpose: torch's Muon orthogonalises in bf16, so
    the fp32 rounding differences of a gradient summed in another order (two ranks, two stages) flip single bf16
    ulps of the update. Measured: at most 4.5e-5 in loss and 1.6e-4 in grad norm over 6 steps; an unsynchronised
    or mis-scaled gradient moves the loss by more than 1e-2 from step 2 on.
    """
    losses, ref_losses = train_losses(layout), train_losses(single)
    norms, ref_norms = grad_norms(layout), grad_norms(single)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert losses[step] == pytest.approx(ref_losses[step], abs=2e-4), step
        assert norms[step] == pytest.approx(ref_norms[step], rel=1e-3), step
        assert norms[step] > MAX_NORM, step


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(setup, muon_reference):  # noqa: F811
    ddp = run(
        setup,
        "muon-ddp",
        *MUON,
        *TWO,
        "--max-steps",
        "6",
        launcher=[*ACCELERATE, "--main_process_port", str(free_port())],
    )
    # the same start, before any orthogonalised step (up to the order DDP sums the two halves of the batch in)
    assert train_losses(ddp)[1] == pytest.approx(train_losses(muon_reference)[1], abs=1e-6)
    assert_close_run(ddp, muon_reference)


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_under_one_process(setup, muon_reference):  # noqa: F811
    """3 steps on a 2-stage pipeline (each stage's Muon and AdamW state saved by name), then 3 in one process."""
    pipe = run(setup, "muon-pipe", *MUON, *TWO, "--pipeline", "--max-steps", "3",
               launcher=[*DEEPSPEED, "--master_port", str(free_port())])  # fmt: skip
    run(setup, "muon-pipe", *MUON, *ONE, "--max-steps", "6", fresh=False)
    assert_close_run(pipe, muon_reference)
