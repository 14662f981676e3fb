"""The DeepSpeed layer list computes the same loss and gradients as Transformer.forward; names convert both ways."""

import functools
import glob
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_models import build, packed_batch, small_config

from models import from_pipeline_state_dict, pipeline_layers, pipeline_loss, to_pipeline_state_dict

ROOT = Path(__file__).resolve().parents[1]


def read_pipeline_checkpoint(ckpt_dir: str, cfg) -> dict[str, torch.Tensor]:
    """A full Transformer state dict from DeepSpeed's own `layer_XX-*model_states.pt` files (its save format, which
    train.py does not use: here it checks the name conversion against what DeepSpeed itself writes)."""
    n = cfg.num_hidden_layers
    merged = {}
    for idx in range(n + 3):
        files = sorted(glob.glob(os.path.join(ckpt_dir, f"layer_{idx:02d}-*model_states.pt")))
        if not files:
            if idx == n + 2 and cfg.tie_word_embeddings:
                continue  # the tied head has no file of its own: its weight is layer 0's embedding
            raise ValueError(f"pipeline checkpoint {ckpt_dir} has no file for layer {idx} (layer_{idx:02d}-*)")
        layer = torch.load(files[0], map_location="cpu", weights_only=True)
        merged.update({f"{idx}.{name}": tensor for name, tensor in layer.items()})
    return from_pipeline_state_dict(merged, cfg)


def sequential_pipeline(specs):
    """Build the specs the way PipelineModule._build does on a single stage, without a process group.

    Returns the forward functions in order and a module whose state_dict names match PipelineModule's.
    """
    from deepspeed.pipe import TiedLayerSpec

    holder, tied, funcs = nn.Module(), nn.ModuleDict(), []
    for idx, spec in enumerate(specs):
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
            module = tied[spec.key]
            funcs.append(module if spec.forward_fn is None else functools.partial(spec.forward_fn, module))
        else:
            module = spec.build()
            holder.add_module(str(idx), module)
            funcs.append(module)
    holder.tied_modules = tied
    return funcs, holder


@pytest.mark.parametrize("family", ["llama", "deepone"])  # tied + final norm / untied + no final norm
def test_layer_list_equals_forward_loss_and_gradients(family):
    cfg = small_config(family)
    model = build(cfg, "eager")
    batch = packed_batch(cfg.vocab_size)
    loss = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
    loss.backward()

    funcs, holder = sequential_pipeline(pipeline_layers(cfg, "eager"))
    assert len(funcs) == cfg.num_hidden_layers + 3
    holder.load_state_dict(to_pipeline_state_dict(model.state_dict(), cfg))  # strict: the names match exactly
    x = (batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["labels"])
    for f in funcs:
        x = f(x)
    labels = int((batch["labels"] != -100).sum())
    x = pipeline_loss(x, (batch["labels"], torch.tensor(float(labels))))  # the head sums; loss_fn normalises
    assert x.dim() == 0 and abs(x.item() - loss.item()) <= 1e-6
    x.backward()
    grads = from_pipeline_state_dict({n: p.grad for n, p in holder.named_parameters()}, cfg)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_conversion_round_trips(tied):
    cfg = small_config(tie_word_embeddings=tied, num_hidden_layers=11)  # two-digit layer indices
    sd = build(cfg).state_dict()
    converted = to_pipeline_state_dict(sd, cfg)
    assert ("tied_modules.embed.embed_tokens.weight" in converted) == tied
    assert "12.norm.weight" in converted and "11.mlp.down_proj.weight" in converted
    back = from_pipeline_state_dict(converted, cfg)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_pipeline_module_matches_and_saves_loadable_layer_files(tmp_path):
    """A one-stage deepspeed PipelineModule (gloo, 1 process) in a subprocess: names, loss, layer_XX files."""
    script = textwrap.dedent(
        f"""
        import sys, torch, deepspeed
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
        from models import load_pipeline_state, pipeline_layers, to_pipeline_state_dict
        from test_models_pipeline import read_pipeline_checkpoint
        from test_models import build, packed_batch, small_config

        deepspeed.init_distributed(dist_backend="gloo")
        for family in ("qwen3", "deepone"):
            cfg = small_config(family)
            model = build(cfg)
            batch = packed_batch(cfg.vocab_size)
            with torch.no_grad():
                ref = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
            pipe = PipelineModule(pipeline_layers(cfg), num_stages=1, loss_fn=lambda loss, _: loss)
            assert set(pipe.state_dict()) == set(to_pipeline_state_dict(model.state_dict(), cfg))
            load_pipeline_state(pipe, model.state_dict(), cfg)
            with torch.no_grad():
                loss = pipe((batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["labels"]))
            labels = int((batch["labels"] != -100).sum())
            assert abs(loss.item() / labels - ref.item()) < 1e-6, (loss, ref)  # the last layer returns the sum
            out = {str(tmp_path)!r} + "/" + family
            pipe.checkpoint_parallel_write_pipeline = False  # normally set by deepspeed.initialize's engine
            pipe.save_state_dict(out, checkpoint_engine=TorchCheckpointEngine())
            back = read_pipeline_checkpoint(out, cfg)
            assert set(back) == set(model.state_dict())
            assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
        print("PIPELINE-OK")
        """
    )
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "PIPELINE-OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def test_read_pipeline_checkpoint_reports_missing_layers(tmp_path):
    cfg = small_config()
    with pytest.raises(ValueError, match="layer 0"):
        read_pipeline_checkpoint(str(tmp_path), cfg)
