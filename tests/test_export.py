"""The Hugging Face export of a real run: self-contained, tokenizer and config as trained, and the checkpoint converter.

Each family trains the `tiny` shape for 6 steps (checkpoints at 3 and 6) and is then read back the way users read it:
AutoTokenizer / AutoModelForCausalLM, in a process that cannot see this repository, and (when present) with
transformers 4.x from a separate interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import models
from export import main as export_main
from tests.helpers import PYTHON, ROOT, TINY, train, write_corpus

FAMILIES = ("llama", "qwen3", "deepone")
ROPE_THETA = {"llama": 500000.0, "qwen3": 1000000.0, "deepone": 20000.0}
TEXT = "Return a new dictionary initialized from an optional positional argument."
# A separate interpreter with transformers 4.x, for the compatibility check (skipped when absent); checked with 4.57
# and with 4.51 (models.card.OLDEST_TRANSFORMERS) by pointing TRANSFORMERS4_PYTHON at each:
#   python3 -m venv /tmp/tf457 && /tmp/tf457/bin/pip install torch==2.13.0 "transformers==4.57.*"
TRANSFORMERS4_PYTHON = Path(os.environ.get("TRANSFORMERS4_PYTHON", "/tmp/tf457/bin/python"))

# Runs in a fresh interpreter on an exported folder; prints one JSON object of what a user would see.
READ_BACK = r"""
import importlib.util, json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, ids, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tok(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
    out = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False)
print(json.dumps({
    "version": transformers.__version__,
    "class": type(model).__module__ + "." + type(model).__name__,
    "rope_theta": getattr(model.config, "rope_theta", None),
    "logits": logits.tolist(),
    "encoded": [tok(p).input_ids for p in prompts],
    "pad": tok.pad_token_id,
    "model_max_length": tok.model_max_length,
    "generated": out[:, batch["input_ids"].shape[1]:].tolist(),
    "repository_importable": importlib.util.find_spec("models") is not None,
}))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", max_docs=600)


@pytest.fixture(scope="module", params=FAMILIES)
def run_dir(request, corpus, tmp_path_factory) -> Path:
    """A finished 6-step run of the tiny shape in the given family, with its own trained tokenizer."""
    family = request.param
    out = tmp_path_factory.mktemp(f"run-{family}")
    shape = json.loads((ROOT / "models" / "configs" / "tiny.json").read_text())
    shape.update(family=family, qk_norm=family != "llama", tie_word_embeddings=family != "deepone")
    shape["rope_theta"] = ROPE_THETA[family]  # not transformers' defaults, so a config read wrongly shows
    config = out.parent / f"tiny-{family}.json"
    config.write_text(json.dumps(shape))
    run = train(
        *TINY,
        "--model-config",
        str(config),
        "--dataset",
        str(corpus),
        "--vocab-size",
        "400",
        "--init-model",
        "--max-steps",
        "6",
        "--output-dir",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _read_back(folder: Path, python: str, cwd: Path, prompts: list[str], ids: list[list[int]]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env |= {"HF_MODULES_CACHE": str(cwd / "hf-modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # -I: neither the current folder nor PYTHONPATH lands on sys.path, so this repository cannot be imported.
    cmd = [python, "-I", "-c", READ_BACK, str(folder), json.dumps(ids), json.dumps(prompts)]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _greedy(model: models.Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def _check_read_back(final: Path, got: dict) -> None:
    """What a fresh interpreter read equals our own model and tokenizer on the same folder."""
    ours, cfg = models.load_hf(final)
    ours.eval()
    tok = models_tokenizer(final)
    bos = tok.bos_token_id
    prompts = ["The", TEXT]
    expected = [[bos] + tok.backend_tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    assert got["encoded"] == expected
    ids = torch.tensor(expected[1:])
    with torch.no_grad():
        assert (torch.tensor(got["logits"]) - ours(ids)).abs().max().item() <= 1e-4
    assert got["generated"] == [_greedy(ours, p, 12) for p in expected]
    assert got["pad"] == tok.eos_token_id and got["model_max_length"] == 64
    if cfg.family == "deepone":
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith(".DeepOneForCausalLM")
    else:
        assert got["class"].startswith(f"transformers.models.{cfg.family}.")  # the stock class, no remote code
        assert got["rope_theta"] == cfg.rope_theta


def models_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_final_tokenizer_and_config_are_as_trained(run_dir):
    final = run_dir / "final"
    trainer = json.loads((run_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    tok = models_tokenizer(final)
    run_tok = models_tokenizer(run_dir / "tokenizer")  # what the packer encoded with, BOS added by packing
    bos, eos = run_tok.convert_tokens_to_ids(["<|bos|>", "<|eos|>"])
    encoded = tok(TEXT).input_ids
    assert encoded[0] == bos
    assert encoded == [bos] + run_tok(TEXT, add_special_tokens=False).input_ids  # the ids training saw
    assert (tok.pad_token_id, tok.eos_token_id, tok.model_max_length) == (eos, eos, 64)
    assert "token_type_ids" not in tok(TEXT)
    assert json.loads((final / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    generation = json.loads((final / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == (eos, eos, bos)

    config = json.loads((final / "config.json").read_text())
    if config["model_type"] == "deepone":
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepone.DeepOneForCausalLM"
        assert (final / "modeling_deepone.py").is_file() and (final / "configuration_deepone.py").is_file()
    else:
        theta = ROPE_THETA[config["model_type"]]
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == theta
        assert "auto_map" not in config and not list(final.glob("*.py"))

    card = (final / "README.md").read_text()
    assert f"| tokens seen | {trainer['tokens']:,} |" in card
    assert f"{trainer['eval_loss']:.4f} nats per token" in card
    assert "python eval.py" in card and "lm_eval --model hf" in card


def test_converter_reproduces_final_from_the_last_checkpoint(run_dir, tmp_path):
    out = tmp_path / "converted"
    if "llama" in run_dir.name:  # the command itself, once; the other families call its main() in this process
        cmd = [PYTHON, str(ROOT / "export.py"), str(run_dir / "checkpoints" / "checkpoint-6"), str(out)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert export_main([str(run_dir / "checkpoints" / "checkpoint-6"), str(out)]) == 0
    final = run_dir / "final"
    files = sorted(p.relative_to(final) for p in final.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for name in files:  # same tensors, config, tokenizer, card: byte for byte
        assert (out / name).read_bytes() == (final / name).read_bytes(), name
    a, b = load_file(str(final / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # An earlier checkpoint converts too, into a different model.
    assert export_main([str(run_dir / "checkpoints" / "checkpoint-3"), str(tmp_path / "early")]) == 0
    c = load_file(str(tmp_path / "early" / "model.safetensors"))
    assert c.keys() == a.keys() and not all(torch.equal(a[k], c[k]) for k in a)


def test_deepone_export_loads_from_a_copy_without_the_repository(run_dir, tmp_path):
    if "deepone" not in run_dir.name:
        pytest.skip("the remote-code check concerns deepone only (llama/qwen3 are covered by the 4.x check)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = shutil.copytree(run_dir / "final", elsewhere / "model")
    tok = models_tokenizer(copy)
    ids = [[tok.bos_token_id] + tok(TEXT, add_special_tokens=False).input_ids]
    got = _read_back(copy, sys.executable, elsewhere, ["The", TEXT], ids)
    assert got["repository_importable"] is False
    _check_read_back(copy, got)


def test_export_reads_the_same_in_transformers_4(run_dir, tmp_path):
    if not TRANSFORMERS4_PYTHON.is_file():
        pytest.skip(f"no transformers 4.x interpreter at {TRANSFORMERS4_PYTHON} (set TRANSFORMERS4_PYTHON)")
    copy = shutil.copytree(run_dir / "final", tmp_path / "model")
    tok = models_tokenizer(copy)
    ids = [[tok.bos_token_id] + tok(TEXT, add_special_tokens=False).input_ids]
    got = _read_back(copy, str(TRANSFORMERS4_PYTHON), tmp_path, ["The", TEXT], ids)
    assert got["version"].startswith("4.")
    _check_read_back(copy, got)


def test_converter_rejects_bad_input_in_one_line(run_dir, corpus, tmp_path, capsys):
    if "llama" not in run_dir.name:
        pytest.skip("checked once, on the llama run")
    damaged = shutil.copytree(run_dir / "checkpoints" / "checkpoint-6", tmp_path / "checkpoint-6")
    weights = damaged / "model-0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    other = data.save_tokenizer(data.train_tokenizer(texts[:50], vocab_size=300), tmp_path / "other-tokenizer")
    last = str(run_dir / "checkpoints" / "checkpoint-6")
    cases = {
        "not a checkpoint": ([str(run_dir / "final"), str(tmp_path / "a")], "not a checkpoint"),
        "another tokenizer": ([last, str(tmp_path / "d"), "--tokenizer", str(other)], "not the one"),
        "missing": ([str(tmp_path / "nowhere"), str(tmp_path / "b")], "not a checkpoint"),
        "damaged": ([str(damaged), str(tmp_path / "c")], "damaged"),
        "occupied output": ([last, str(occupied)], "not an empty folder"),
    }
    for case, (args, says) in cases.items():
        assert export_main(args) == 2, case
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], (case, lines)
    done = subprocess.run([PYTHON, str(ROOT / "export.py"), str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert not any((tmp_path / n).exists() for n in "abcd")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
