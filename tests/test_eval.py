"""eval.py, bits per byte in training, the metric modules, and the local copy of the default corpus (smollm=PATH).

One tiny run trains on a local two-subset copy of the corpus; its final/ folder and its checkpoint are evaluated and
compared with per-token log-likelihoods computed here directly with transformers.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from tests.helpers import PYTHON, ROOT, TINY, train, write_corpus

EVAL = [PYTHON, str(ROOT / "eval.py")]
LN2 = math.log(2)
TEXTS = [  # a fixed text: ASCII, accents, CJK and an emoji (multi-byte characters split across byte tokens)
    "The argument parser reads the command line and returns a namespace of options.",
    "Café au lait, naïve façade: déjà vu in a résumé.",
    "日本語のテキストと絵文字 🙂 も数えます。",
    "Short.",
    "A longer paragraph about files: open() returns a file object; read() returns its text, and close() ends it. "
    "Paths can be joined with the slash operator, and iterdir() lists a folder.",
]


def write_parquet(path: Path, column: str, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)


def make_mirror(root: Path, cosmopedia: list[str], fineweb: list[str], column: str = "text") -> Path:
    """A local copy laid out as huggingface-cli downloads the corpus: <root>/<subset>/train-*.parquet."""
    write_parquet(root / "cosmopedia-v2" / "train-00000-of-00001.parquet", column, cosmopedia)
    half = len(fineweb) // 2
    write_parquet(root / "fineweb-edu-dedup" / "train-00000-of-00002.parquet", column, fineweb[:half])
    write_parquet(root / "fineweb-edu-dedup" / "train-00001-of-00002.parquet", column, fineweb[half:])
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3:1 local copy of the corpus, a tokenizer trained on it, and a 3-step run trained on smollm=PATH."""
    root = tmp_path_factory.mktemp("eval")
    texts = [json.loads(line)["text"] for line in write_corpus(root / "docs.jsonl").read_text().splitlines()]
    mirror = make_mirror(root / "smollm", texts[:900], texts[900:1200])
    tok = data.train_tokenizer(texts, vocab_size=512)
    data.save_tokenizer(tok, root / "tokenizer")
    out = root / "run"
    run = train(
        *TINY,
        "--dataset",
        f"smollm={mirror}",
        "--tokenizer",
        str(root / "tokenizer"),
        "--init-model",
        "--max-steps",
        "3",
        "--save-strategy",
        "steps",
        "--max-length",
        "128",
        "--output-dir",
        str(out),
    )  # fmt: skip  (128: the longest of TEXTS fits one window)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    fixed = root / "fixed.jsonl"
    fixed.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return {"root": root, "run": out, "fixed": fixed, "mirror": mirror, **_damaged(root, out / "final", texts)}


def _damaged(root: Path, final: Path, texts: list[str]) -> dict[str, Path]:
    """Copies of the export with one thing wrong each, and multiple-choice files with one bad example each."""
    made = {}
    for name in ("cfglist", "cfgtypes", "truncated", "bigtok"):
        made[name] = root / name
        shutil.copytree(final, made[name])
    (made["cfglist"] / "config.json").write_text("[]")
    config = json.loads((final / "config.json").read_text()) | {"hidden_size": "big"}
    (made["cfgtypes"] / "config.json").write_text(json.dumps(config))
    weights = (final / "model.safetensors").read_bytes()
    (made["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    big = data.train_tokenizer(texts, vocab_size=1024)  # more ids than the model's 512 rows
    data.save_tokenizer(big, made["bigtok"] / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(made["bigtok"] / "tok" / name, made["bigtok"] / name)
    good = {"context": "The cat", "choices": ["sat.", "flew."], "label": 0}
    for name, bad in (("mc-empty", {"choices": ["sat.", ""]}), ("mc-listctx", {"context": ["a", "b"]}),
                      ("mc-boollabel", {"label": True})):  # fmt: skip
        made[name] = root / f"{name}.jsonl"
        made[name].write_text(json.dumps(good) + "\n" + json.dumps(good | bad) + "\n")
    made["mc-notjson"] = root / "mc-notjson.jsonl"
    made["mc-notjson"].write_text('not json at all\n{"context":\n')
    made["mc-nothing"] = root / "mc-nothing.jsonl"
    made["mc-nothing"].write_text("")
    return made


def run_eval(*args: str) -> subprocess.CompletedProcess:
    env_extra = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*EVAL, *args], cwd=ROOT, env=os.environ | env_extra, capture_output=True, text=True)


@functools.cache
def hf_model(final: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(final).eval()


def hf_nats(final: Path, ids: list[int]) -> np.ndarray:
    """-log p of ids[1:], computed here with transformers on the exported folder (an independent oracle)."""
    model = hf_model(final)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    return -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_eval_bits_per_byte_equals_a_hand_computation(setup):
    final, checkpoint = setup["run"] / "final", setup["run"] / "checkpoints" / "checkpoint-3"
    tok = data.load_tokenizer(final)
    bos, eos = data.bos_eos_ids(tok)
    text_nats = all_nats = tokens = 0.0
    for text in TEXTS:
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        nats = hf_nats(final, [bos, *ids, eos])
        text_nats += nats[:-1].sum()  # the EOS target stands for no text
        all_nats += nats.sum()
        tokens += len(ids) + 1
    num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    expected = {"bits_per_byte": text_nats / (LN2 * num_bytes), "loss": all_nats / tokens}

    for model in (final, checkpoint):  # transformers on the export, and our model from the checkpoint
        out = run_eval(str(model), "--dataset", str(setup["fixed"]), "--split", "all", "--max-length", "128", "--json")
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout)
        assert result["documents"] == len(TEXTS) and result["bytes"] == num_bytes and result["tokens"] == tokens
        assert result["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-5), model
        assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5), model
        assert result["perplexity"] == pytest.approx(math.exp(expected["loss"]), rel=1e-5)

    # Windows shorter than the documents: every token is still scored once, each with less context.
    short = json.loads(run_eval(str(final), "--dataset", str(setup["fixed"]), "--split", "all", "--max-length", "8",
                                "--json").stdout)  # fmt: skip
    # (a 3-step model gains little from context: the two differ by ~3e-4 relative, far above float noise)
    assert short["tokens"] == tokens and short["bits_per_byte"] != pytest.approx(expected["bits_per_byte"], rel=1e-6)


def load_eval_module():
    """eval.py as a module (its name shadows no module: the builtin eval is a function)."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("eval")


def test_windows_score_every_target_once_with_the_most_context_that_fits():
    evaluation = load_eval_module()
    tokens = list(range(100, 123))  # 22 targets
    for max_length in (1, 5, 8, 22, 40):
        requests = evaluation.windows(tokens, max_length)
        scored = [t for window, first in requests for t in window[first + 1 :]]
        assert scored == tokens[1:], max_length
        assert all(len(window) - 1 <= max_length for window, _ in requests)
        # every window but the first reads exactly max_length inputs
        assert all(len(window) - 1 == min(max_length, len(tokens) - 1) for window, _ in requests[1:])


def test_multiple_choice_scores_as_computed_by_hand(setup):
    final = setup["run"] / "final"
    tok = data.load_tokenizer(final)
    bos, _ = data.bos_eos_ids(tok)

    def encode(text):
        return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids

    examples = [
        ("The parser reads the", ["command line", "weather", "ocean floor and the sky above it"]),
        ("Open the file and", ["read its text", "sing", "eat it", "paint"]),
        ("A folder holds", ["files", "nothing but a very long list of unrelated words"]),
        ("Paths are joined with the", ["slash operator", "glue", "help of friends"]),
    ]
    predictions, raw = [], []
    for context, choices in examples:
        ctx = [bos, *encode(context)]
        ll = []
        for choice in choices:
            full = [bos, *encode(context + " " + choice)]
            assert full[: len(ctx)] == ctx
            ll.append(-hf_nats(final, full)[len(ctx) - 1 :].sum())
        ll = np.array(ll)
        predictions.append(int(np.argmax(ll / np.array([len(c.encode()) for c in choices]))))
        raw.append(int(np.argmax(ll)))
    # Labels: the normalised prediction for three examples, another choice for the fourth -> accuracy 0.75.
    labels = [p if i != 3 else (p + 1) % len(examples[i][1]) for i, p in enumerate(predictions)]
    rows = [{"ctx": c, "endings": ch, "label": str(lab)} for (c, ch), lab in zip(examples[:3], labels, strict=False)]
    context, choices = examples[3]  # ARC-style fields: question, {text, label}, answerKey
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    rows.append({"question": context, "choices": {"text": choices, "label": letters}, "answerKey": letters[labels[3]]})
    mc = setup["root"] / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = run_eval(str(final), "--multiple-choice", str(mc), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["examples"] == 4
    assert result["accuracy"] == 0.75
    assert result["accuracy_unnormalized"] == np.mean([r == lab for r, lab in zip(raw, labels, strict=True)])


def test_metric_modules_load_offline_without_network(tmp_path):
    code = f"""
import socket
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
import evaluate
acc = evaluate.load({str(ROOT / "metrics" / "accuracy")!r}, keep_in_memory=True)
bpb = evaluate.load({str(ROOT / "metrics" / "bits_per_byte")!r}, keep_in_memory=True)
print(acc.compute(predictions=[0, 2, 1, 1], references=[0, 1, 1, 1])["accuracy"])
print(bpb.compute(nats=[2.0, 1.0, 0.5], num_bytes=[3, 1, 0])["bits_per_byte"])
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy, bpb = map(float, out.stdout.split())
    assert accuracy == 0.75
    assert bpb == pytest.approx(3.0 / (LN2 * 4))


def test_training_logs_bits_per_byte_and_the_documents_of_each_source(setup):
    """The eval records' bits per byte equals a hand computation on the held-out batches; per-source counts logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import models

    run_dir = sorted((setup["run"] / "runs").iterdir())[-1]
    records = [json.loads(line) for line in (run_dir / "trainer_logs.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and all(r["bits_per_byte"] > 0 for r in evals)

    # The last eval (step 3) from the exported weights and the same held-out batches, by hand.
    tok = data.load_tokenizer(setup["run"] / "final")
    model, _ = models.load_hf(setup["run"] / "final")
    mix = data.parse_mix(f"smollm={setup['mirror']}")
    table = data.token_byte_lengths(tok)
    text_nats = num_bytes = 0.0
    for batch in data.eval_batches(mix, tok, max_length=128, batch_size=4, num_batches=2):
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"]).double()
        labels = batch["labels"]
        valid = labels != data.IGNORE_INDEX
        nats = -torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
        sizes = torch.as_tensor(table)[labels.clamp(min=0)] * valid
        text_nats += float((nats * (sizes > 0)).sum())
        num_bytes += float(sizes.sum())
    last = [r for r in evals if r["step"] == 3][-1]
    assert last["bits_per_byte"] == pytest.approx(text_nats / (LN2 * num_bytes), rel=1e-5)

    trains = [r for r in records if r["type"] == "train"]
    for record in trains:  # the documents and tokens of each source in the rows trained on, at every step
        sources = [k.removeprefix("tokens/") for k in record if k.startswith("tokens/")]
        assert sorted(sources) == ["smollm/cosmopedia-v2", "smollm/fineweb-edu-dedup"]
        assert sum(record[f"tokens/{s}"] for s in sources) == record["tokens"]
        assert 0 < sum(record[f"docs/{s}"] for s in sources) <= record["tokens"] // 2  # BOS + EOS at least
    events = EventAccumulator(str(run_dir)).Reload()
    scalars = events.Tags()["scalars"]
    assert "eval/bits_per_byte" in scalars and "train/docs/smollm/fineweb-edu-dedup" in scalars
    assert "train/tokens/smollm/cosmopedia-v2" in scalars


def encode_words(texts: list[str]) -> list[list[int]]:
    return [[7] * len(t.split()) for t in texts]


def test_local_copy_of_the_corpus_reads_both_subsets_in_proportion(tmp_path, monkeypatch):
    from data.order import is_eval, text_hashes
    from data.stream import DocumentStream

    cosmo = [f"cosmopedia document number {i} about a topic" for i in range(3072)]
    fine = [f"fineweb page {i} with some educational text" for i in range(1024)]
    mirror = make_mirror(tmp_path / "corpus", cosmo, fine, column="content")
    with pytest.raises(ValueError, match="--text-column"):  # the documents are not in 'text'
        DocumentStream(data.parse_mix(f"smollm={mirror}"), encode_words, 0, 1)
    monkeypatch.setenv("SMOLLM_CORPUS_DIR", str(mirror))  # plain `smollm` reads the local copy too
    for spec in (f"smollm={mirror}", "smollm"):
        mix = data.parse_mix(spec, text_column="content")
        assert [(s.kind, s.label) for s in mix.sources] == [
            ("mirror", "smollm/cosmopedia-v2"),
            ("mirror", "smollm/fineweb-edu-dedup"),
        ]
        docs = DocumentStream(mix, encode_words, 0, 1)
        assert [c.source.num_docs for c in docs.cursors[0]] == [3072, 1024]  # parquet footers, both fineweb files
        for _ in range(4):  # 4 chunks of 1,024 = one balanced pass over both subsets
            docs.next_chunk()
        counts = docs.source_counts()
        for label, texts in (("smollm/cosmopedia-v2", cosmo), ("smollm/fineweb-edu-dedup", fine)):
            trained = [
                t for t, held in zip(texts, is_eval(text_hashes(texts), mix.eval_fraction), strict=True) if not held
            ]
            assert counts[label] == {"docs": len(trained), "tokens": sum(len(t.split()) + 2 for t in trained)}
    with pytest.raises(ValueError, match="fineweb-edu-dedup/"):
        data.parse_mix(f"smollm={tmp_path / 'corpus' / 'cosmopedia-v2'}")


def test_text_column_reads_another_field(tmp_path):
    from data.sources import open_source

    jsonl = tmp_path / "code.jsonl"
    jsonl.write_text("".join(json.dumps({"content": f"def f{i}(): return {i}", "text": "x"}) + "\n" for i in range(5)))
    source = open_source(data.parse_mix(str(jsonl), text_column="content").sources[0])
    assert source.fetch(np.arange(5))[0] == [f"def f{i}(): return {i}" for i in range(5)]
    with pytest.raises(ValueError, match="--text-column"):
        open_source(data.parse_mix(str(jsonl), text_column="body").sources[0])


@pytest.mark.parametrize(
    "args,says",
    [
        (["/nonexistent/model", "--dataset", "builtin"], "neither a Hugging Face model folder"),
        (["{final}"], "nothing to evaluate"),
        (["{final}", "--dataset", "/nonexistent/file.jsonl"], "does not exist"),
        (["{final}", "--dataset", "{fixed}"], "--split all"),  # 5 documents: none held out
        (["{final}", "--multiple-choice", "{fixed}"], "has none of the fields"),
        (["{final}", "--dataset", "{fixed}", "--max-docs", "0"], "--max-docs"),
        (["{cfglist}", "--dataset", "{fixed}", "--split", "all"], "cannot load"),
        (["{cfgtypes}", "--dataset", "{fixed}", "--split", "all"], "expected int, got str"),
        (["{truncated}", "--dataset", "{fixed}", "--split", "all"], "cannot load"),
        (["{bigtok}", "--dataset", "{fixed}", "--split", "all"], "embeds only 512"),
        (["{final}", "--dataset", "{fixed}", "--split", "all", "--max-length", "100000"], "positions of"),
        (["{final}", "--multiple-choice", "{mc-empty}"], "non-empty strings"),
        (["{final}", "--multiple-choice", "{mc-listctx}"], "the context must be a string"),
        (["{final}", "--multiple-choice", "{mc-boollabel}"], "label True"),
        (["{final}", "--multiple-choice", "{fixed}", "--mc-limit", "-3"], "--mc-limit"),
        (["{final}", "--multiple-choice", "{mc-notjson}"], "cannot be read as json"),  # as a command: datasets logs
        (["{final}", "--dataset", ""], "--dataset is empty"),
        (["{final}", "--multiple-choice", "{mc-nothing}"], "is empty"),
    ],
)
def test_eval_bad_input_exits_2_with_one_line(setup, args, says, capsys):
    paths = {k: v for k, v in setup.items() if isinstance(v, Path)} | {"final": setup["run"] / "final"}
    args = [a.format(**paths) for a in args]
    if args[0].startswith("/nonexistent") or "notjson" in args[-1]:  # as real commands: all of stderr
        out = run_eval(*args, "--json")
        code, stdout, stderr = out.returncode, out.stdout, out.stderr
    else:
        code = load_eval_module().main([*args, "--json"])
        stdout, stderr = capsys.readouterr()
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in stderr, stderr[-2000:]
    assert stdout == ""


def test_per_token_losses_match_the_mean_loss():
    """reduction="none" (what evaluation sums) gives each label's nats; their mean is the training loss."""
    import models

    cfg = models.load_model_config("tiny", vocab_size=97)
    torch.manual_seed(0)
    model = models.Transformer(cfg).eval()
    model.init_weights()
    ids = torch.randint(0, 97, (2, 33))
    labels = ids[:, 1:].clone()
    labels[0, 5] = labels[1, 20] = data.IGNORE_INDEX
    with torch.no_grad():
        nats = model(ids[:, :-1], labels=labels, reduction="none")
        mean = model(ids[:, :-1], labels=labels)
        logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)
    valid = labels != data.IGNORE_INDEX
    expected = -logp.gather(2, labels.clamp(min=0)[..., None])[..., 0] * valid
    assert nats.shape == labels.shape and bool((nats[~valid] == 0).all())
    assert torch.allclose(nats.double(), expected, atol=1e-5)
    assert (nats.sum() / valid.sum()).item() == pytest.approx(mean.item(), rel=1e-6)
