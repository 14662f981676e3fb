"""Hugging Face export and import: stock classes for llama/qwen3, the registered class for deepone, safetensors only."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import build, packed_batch, small_config
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from models import export_hf, load_hf

VOCAB = ["<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(40)]


def word_tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<bos>", "<eos>"])
    return tok


@pytest.mark.parametrize("family", ["llama", "qwen3", "deepone"])
def test_export_loads_with_auto_classes_and_round_trips(family, tmp_path):
    cfg = small_config(family)
    model = build(cfg)
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer=word_tokenizer(), bos_token_id=1, eos_token_id=2)
    config = json.loads((out / "config.json").read_text())
    expected = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "deepone": "DeepOneForCausalLM"}[family]
    assert config["architectures"] == [expected] and config["model_type"] == family
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["tie_word_embeddings"] == cfg.tie_word_embeddings
    if family != "deepone":
        assert config.get("attention_bias") is False
        assert "auto_map" not in config  # nothing needs remote code
    if family == "llama":
        assert config["mlp_bias"] is False
    names = set(load_file(str(out / "model.safetensors")))
    assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == expected
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<bos>", "w3"]) == [1, 6]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<bos>", "<eos>")

    again, cfg2 = load_hf(out)
    assert cfg2 == cfg
    for (name, a), (name2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert name == name2 and torch.equal(a, b)
    batch = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        args = (batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        assert torch.equal(model(*args), again(*args))


def test_deepone_generates_and_handles_left_padding(tmp_path):
    cfg = small_config("deepone")
    export_hf(build(cfg), cfg, tmp_path / "hf", eos_token_id=2)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    attention_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = hf(ids).logits
        left = hf(padded, attention_mask=attention_mask).logits[:, 3:]
    assert (plain - left).abs().max().item() <= 1e-5
    out = hf.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, 10)
    with torch.no_grad():  # greedy: the first generated token is the argmax of the last logits
        assert out[0, 6].item() == plain[0, -1].argmax().item()


def test_export_accepts_a_transformers_tokenizer_and_casts(tmp_path):
    cfg = small_config()
    fast = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), bos_token="<bos>", eos_token="<eos>")
    out = export_hf(build(cfg), cfg, tmp_path / "hf", tokenizer=fast, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # taken from the tokenizer
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_load_hf_rejects_what_it_cannot_represent(tmp_path):
    cfg = small_config()
    out = export_hf(build(cfg), cfg, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())

    scaled = dict(config, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0})
    (out / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(ValueError, match="llama3"):
        load_hf(out)
    (out / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(ValueError, match="gpt2"):
        load_hf(out)
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(str(out / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight|norm.weight"):
        load_hf(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load_hf(out)
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path / "nowhere")


def test_load_hf_reads_sharded_checkpoints(tmp_path):
    cfg = small_config("qwen3")
    model = build(cfg)
    out = export_hf(model, cfg, tmp_path / "hf")
    weights = load_file(str(out / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(out / file))
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "model.safetensors").unlink()
    again, _ = load_hf(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
