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


def _greedy_full_prefix(model, prompt: list[int], n: int) -> list[int]:
    """The oracle: n greedy tokens, each the argmax after re-running our Transformer on the whole prefix."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("family", ["llama", "qwen3", "deepone"])
def test_generate_with_left_padding_equals_a_full_prefix_greedy_loop(family, tmp_path):
    """24 greedy tokens from `generate` on a left-padded batch of 2 equal, token for token, our model re-run on the
    whole prefix at every step (the deepone export uses its KV cache: every step after the first feeds one token)."""
    cfg = small_config(family, vocab_size=300)
    model = build(cfg).eval()
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer=word_tokenizer(), bos_token_id=1, eos_token_id=2)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
        family, "DeepOneForCausalLM"
    )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 4)]
    width = max(map(len, prompts))
    pad = 2  # EOS doubles as the pad token
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    fed = []
    hook = hf.get_input_embeddings().register_forward_pre_hook(lambda _, args: fed.append(args[0].shape[1]))
    with torch.no_grad():
        generated = hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            pad_token_id=pad,
        )
    hook.remove()
    assert fed[0] == width and fed[1:] == [1] * 23  # a KV cache: one new token per step after the prompt
    for row, prompt in enumerate(prompts):
        assert generated[row, width:].tolist() == _greedy_full_prefix(model, prompt, 24), row


def test_deepone_logits_match_with_padding_and_cache(tmp_path):
    """Left padding and the cache change nothing: logits equal our Transformer's on the unpadded rows."""
    cfg = small_config("deepone")
    model = build(cfg).eval()
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, cfg, tmp_path / "hf", eos_token_id=2)).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    attention_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ours = model(ids)
        plain = hf(ids).logits
        left = hf(padded, attention_mask=attention_mask).logits[:, 3:]
        first = hf(ids[:, :4], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        rest = hf(ids[:, 4:], cache=cache, use_cache=True).logits
    assert (ours - plain).abs().max().item() <= 1e-5
    assert (plain - left).abs().max().item() <= 1e-5
    assert (plain[:, 4:] - rest).abs().max().item() <= 1e-5


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
