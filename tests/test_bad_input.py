"""Bad input, table-driven: every class of bad option, model config, file, output dir and job-control input exits 2
with exactly one line on stderr and no traceback, and leaves a trained output dir byte-identical.

Most cases call train.main(argv) in this process (a bad input must fail in validation, in well under a second);
a handful run the real command line in a subprocess. Every case checks the whole output dir: same files, same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import train as train_script
from lifecycle import control
from lifecycle.jobs import JobControl, list_jobs
from tests.helpers import PYTHON, ROOT, TINY, train, write_corpus

TINY_CONFIG = json.loads((ROOT / "models" / "configs" / "tiny.json").read_text())


def _digest(folder: Path) -> str:
    """Every file's relative path and bytes under `folder`."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _word_level_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import data

    vocab = {w: i for i, w in enumerate(["<unk>", "<|bos|>", "<|eos|>", "the", "a", "of", "to", "and"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|bos|>", eos_token="<|eos|>")
    data.save_tokenizer(tok, folder)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A trained output dir (3 steps, one checkpoint, final/), its data and tokenizer, and a folder of bad files."""
    import data

    root = tmp_path_factory.mktemp("bad-input")
    corpus = write_corpus(root / "docs.jsonl", max_docs=600)
    tok_dir = root / "tokenizer"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), tok_dir)
    out = root / "trained"
    run = train(*TINY, "--dataset", str(corpus), "--tokenizer", str(tok_dir), "--init-model", "--max-steps", "3",
                "--output-dir", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file() and (out / "final").is_dir()

    f = root / "files"
    f.mkdir()
    good = corpus.read_text().splitlines()
    (f / "empty.txt").write_bytes(b"")
    (f / "blank.txt").write_text("\n\n  \n\n")
    (f / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (f / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n\nsecond document\n".encode("latin-1"))
    (f / "fake.parquet").write_text("this is not parquet")
    (f / "first-line.jsonl").write_text('{"text": "ok"\n' + "\n".join(good[:5]) + "\n")
    (f / "deep-line.jsonl").write_text("\n".join(good[:499]) + "\n{not json}\n" + "\n".join(good[499:]) + "\n")
    (f / "number-text.jsonl").write_text("\n".join(good[:300]) + '\n{"text": 17}\n')
    (f / "null-text.jsonl").write_text('{"text": null}\n' + "\n".join(good[:5]) + "\n")
    (f / "list-record.jsonl").write_text(good[0] + "\n[1, 2, 3]\n")
    (f / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (f / "no-text.jsonl").write_text('{"body": "a document under the wrong key"}\n')
    (f / "array.json").write_text(json.dumps([{"text": "a"}, {"text": ["b"]}]))
    _word_level_tokenizer(f / "unk-tokenizer")  # knows 5 words: nearly every token of the corpus is unknown
    (f / "loop-a").symlink_to(f / "loop-b")  # a loop of links
    (f / "loop-b").symlink_to(f / "loop-a")
    (f / "dangling").symlink_to(f / "nothing-here")
    (f / "bad-tokenizer.json").write_text('{"version": "1.0", "model": ')
    (f / "tokenizer-dir").mkdir()
    (f / "tokenizer-dir" / "tokenizer.json").write_bytes(b"\x00\x01binary")
    (f / "empty-tokenizer.json").write_bytes(b"")
    for name, change in CONFIG_CHANGES.items():
        (f / f"{name}.json").write_text(json.dumps({**TINY_CONFIG, **change}) if change is not None else "")
    (f / "config-list.json").write_text("[1, 2]")
    (f / "config-missing-field.json").write_text(
        json.dumps({k: v for k, v in TINY_CONFIG.items() if k != "hidden_size"})
    )
    (f / "config-unknown-field.json").write_text(json.dumps({**TINY_CONFIG, "hidden_sise": 128}))
    for name, breakage in INIT_FROM_BREAKAGES.items():
        folder = f / name
        shutil.copytree(out / "final", folder)
        breakage(folder)
    (f / "a-dir.jsonl").mkdir()
    (f / "checkpoints-file").mkdir()
    (f / "checkpoints-file" / "checkpoints").write_text("not a folder")
    (f / "lock-folder" / "run.lock").mkdir(parents=True)
    return {"corpus": corpus, "tok": tok_dir, "out": out, "f": f, "root": root}


def _rewrite_config(**change):
    def apply(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))

    return apply


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


INIT_FROM_BREAKAGES = {
    "init-bad-json": lambda d: (d / "config.json").write_text("{bad"),
    "init-no-config": lambda d: (d / "config.json").unlink(),
    "init-no-weights": lambda d: (d / "model.safetensors").unlink(),
    "init-truncated-weights": _truncate,
    "init-garbage-weights": lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64),
    "init-wrong-shape": _rewrite_config(hidden_size=256, head_dim=64),
    "init-zero-heads": _rewrite_config(num_attention_heads=0),
    "init-string-size": _rewrite_config(hidden_size="128"),
    "init-unknown-type": _rewrite_config(model_type="gpt2"),
}

# Model config JSON files: the tiny config with one field changed (None = an empty file).
CONFIG_CHANGES = {
    "config-string-size": {"hidden_size": "128"},
    "config-float-size": {"intermediate_size": 384.5},
    "config-integral-float": {"num_hidden_layers": 4.0},
    "config-zero-heads": {"num_attention_heads": 0},
    "config-negative-head-dim": {"head_dim": -32},
    "config-odd-head-dim": {"head_dim": 33},
    "config-zero-kv-heads": {"num_key_value_heads": 0},
    "config-kv-not-divisor": {"num_key_value_heads": 3},
    "config-not-divisible": {"hidden_size": 130},
    "config-tie-string": {"tie_word_embeddings": "yes"},
    "config-bool-layers": {"num_hidden_layers": True},
    "config-nan-eps": {"rms_norm_eps": float("nan")},
    "config-zero-theta": {"rope_theta": 0},
    "config-negative-positions": {"max_position_embeddings": -1},
    "config-unknown-family": {"family": "gpt2"},
    "config-unknown-act": {"hidden_act": "swish"},
    "config-huge-positions": {"max_position_embeddings": 2**30},
    "config-empty": None,
}

# name -> (arguments added to a resume of the trained dir, a phrase the one line must contain).
# {out} {corpus} {tok} {f} are filled in from the workspace.
CASES = {
    # options: values each option's own range refuses (more in test_every_numeric_option_refuses_...)
    "weight decay NaN": (["--weight-decay", "nan"], "--weight-decay: nan is not finite"),
    "negative weight decay": (["--weight-decay", "-0.1"], "out of range"),
    "grad norm inf": (["--max-grad-norm", "inf"], "not finite"),
    "temperature -1": (["--sample-temperature", "-1"], "out of range"),
    "top-k -1": (["--sample-top-k", "-1"], "out of range"),
    "repetition penalty 0": (["--repetition-penalty", "0"], "out of range"),
    "divergence threshold NaN": (["--divergence-threshold", "nan"], "not finite"),
    "rollbacks -1": (["--max-rollbacks", "-1"], "out of range"),
    "rollback factor 2": (["--rollback-lr-factor", "2"], "> 0 and <= 1"),
    "tokenizer docs 0": (["--tokenizer-docs", "0"], "out of range"),
    "seed -1": (["--seed", "-1"], "--seed"),
    "seed 2^70": (["--seed", str(2**70)], "--seed"),
    "learning rate 1e400": (["--learning-rate", "1e400"], "not finite"),
    "batch size 1.5": (["--batch-size", "1.5"], "is not an integer"),
    "max steps 10^30": (["--max-steps", str(10**30)], "too large"),
    "world size 0 in a dry run": (["--dry-run", "--world-size", "0"], "--world-size"),
    "spike factor NaN": (["--inject-lr-spike", "3,nan"], "finite FACTOR"),
    "spike step 0": (["--inject-lr-spike", "0,10"], "STEP >= 1"),
    "unknown backend": (["--dist-backend", "foo"], "is not a backend"),
    "infinite mix weight": (["--dataset", "{corpus}:inf,{corpus}:1"], "finite positive number"),
    "overflowing stage budget": (["--dataset", "{corpus}@99999999999999999999999B;{corpus}"], "at most 2^62"),
    # sizes that cannot fit: refused from the memory estimate
    "batch size 10^7": (["--batch-size", str(10**7)], "GiB"),
    "length 10^8": (
        ["--model-config", "{f}/config-huge-positions.json", "--max-length", str(10**8), "--output-dir", "{root}/new"],
        "GiB",
    ),
    "length beyond the model": (["--max-length", "100000"], "longer than the model supports"),
    # model config fields, named in the message (a resume, then the same under --dry-run)
    **{
        f"config {name.removeprefix('config-')}": (["--model-config", f"{{f}}/{name}.json"], says)
        for name, says in {
            "config-string-size": "hidden_size must be an integer",
            "config-float-size": "intermediate_size must be an integer",
            "config-integral-float": "num_hidden_layers must be an integer",
            "config-zero-heads": "num_attention_heads must be >= 1",
            "config-negative-head-dim": "head_dim must be >= 2",
            "config-odd-head-dim": "head_dim 33 must be even",
            "config-zero-kv-heads": "num_key_value_heads must be >= 1",
            "config-kv-not-divisor": "not a multiple of num_key_value_heads",
            "config-not-divisible": "not divisible by num_attention_heads",
            "config-tie-string": "tie_word_embeddings must be true or false",
            "config-bool-layers": "num_hidden_layers must be an integer",
            "config-nan-eps": "rms_norm_eps must be a finite number",
            "config-zero-theta": "rope_theta must be > 0",
            "config-negative-positions": "max_position_embeddings must be >= 1",
            "config-unknown-family": "family 'gpt2' is unknown",
            "config-unknown-act": "hidden_act 'swish'",
            "config-empty": "not valid JSON",
            "config-list": "must hold a JSON object",
            "config-missing-field": "hidden_size",
            "config-unknown-field": "hidden_sise",
        }.items()
    },
    "dry run: config zero heads": (
        ["--dry-run", "--model-config", "{f}/config-zero-heads.json"],
        "num_attention_heads",
    ),
    "dry run: config tie string": (
        ["--dry-run", "--model-config", "{f}/config-tie-string.json"],
        "tie_word_embeddings",
    ),
    "dry run: config float size": (["--dry-run", "--model-config", "{f}/config-float-size.json"], "intermediate_size"),
    "config is a folder": (["--model-config", "{f}"], "unknown model config"),
    # data files: empty, binary, not UTF-8, invalid JSON (with the line), non-string text, wrong record shapes
    "empty text file": (["--dataset", "{f}/empty.txt"], "empty.txt is empty"),
    "blank text file": (["--dataset", "{f}/blank.txt"], "holds no documents"),
    "binary text file": (["--dataset", "{f}/binary.txt"], "binary, not text"),
    "latin-1 text file": (["--dataset", "{f}/latin1.txt"], "not UTF-8"),
    "fake parquet": (["--dataset", "{f}/fake.parquet"], "not a parquet file"),
    "invalid JSON on line 1": (["--dataset", "{f}/first-line.jsonl"], "first-line.jsonl:1: invalid JSON"),
    "invalid JSON on line 500": (["--dataset", "{f}/deep-line.jsonl"], "deep-line.jsonl:500: invalid JSON"),
    "number text on line 301": (["--dataset", "{f}/number-text.jsonl"], "number-text.jsonl:301: 'text' must be"),
    "null text": (["--dataset", "{f}/null-text.jsonl"], "'text' must be a string, got null"),
    "a list record": (["--dataset", "{f}/list-record.jsonl"], "list-record.jsonl:2"),
    "no text field": (["--dataset", "{f}/no-text.jsonl"], "no 'text' field (fields: body)"),
    "deeply nested JSON": (["--dataset", "{f}/nested.jsonl"], "nested.jsonl:1: JSON nested too deeply"),
    "JSON array with a list text": (["--dataset", "{f}/array.json"], "record 2"),
    "bad file in a mix": (["--dataset", "{corpus}:1,{f}/binary.txt:1"], "binary.txt"),
    "a folder named like a file": (["--dataset", "{f}/a-dir.jsonl"], "holds no .txt"),
    "missing file with an empty weight": (["--dataset", "missing.txt:"], "missing.txt does not exist"),
    "existing file with an empty weight": (["--dataset", "{corpus}:"], "the weight after"),
    # tokenizers
    "truncated tokenizer.json": (["--tokenizer", "{f}/bad-tokenizer.json"], "bad-tokenizer.json cannot be read"),
    "binary tokenizer.json in a folder": (["--tokenizer", "{f}/tokenizer-dir"], "tokenizer.json cannot be read"),
    "empty tokenizer.json": (["--tokenizer", "{f}/empty-tokenizer.json"], "cannot be read"),
    "data file as tokenizer": (["--tokenizer", "{corpus}"], "cannot be read"),
    # the real cause, not a symptom
    "different model": (["--model", "llama-30m"], "num_hidden_layers 4 -> 10"),
    # output dir
    "output dir is a file": (["--output-dir", "{f}/empty.txt"], "is a file, not a directory"),
    "output dir below a file": (["--output-dir", "{f}/empty.txt/run"], "cannot be created"),
    "output dir a link loop": (["--output-dir", "{f}/loop-a"], "is a loop of links"),
    "held-out set beyond memory": (["--eval-batches", "100000000"], "of held-out rows in host memory"),
    "tokenizer of unknowns": (
        ["--tokenizer", "{f}/unk-tokenizer", "--output-dir", "{f}/unk-run"],
        "to its unknown token '<unk>'",
    ),
    "output dir below a link loop": (["--output-dir", "{f}/loop-a/run"], "is a loop of links"),
    "output dir a dangling link": (["--output-dir", "{f}/dangling"], "is a link to nothing"),
    "output dir read-only": (["--output-dir", "/sys/small-llm-run"], "is not writable"),
    "checkpoints is a file": (["--output-dir", "{f}/checkpoints-file"], "checkpoints is a file"),
    "run.lock is a folder": (["--output-dir", "{f}/lock-folder"], "run.lock is not a file"),
    "data is a device": (["--dataset", "/dev/zero"], "neither a file nor a folder"),
    "tokenizer is a device": (["--tokenizer", "/dev/null"], "neither a file nor a folder"),
}
# The first table of bad input (formerly in test_train.py): paths, sizes, models, pipeline and flag combinations.
CASES |= {
    "missing data path": (["--dataset", "/nonexistent/corpus.jsonl"], "does not exist"),
    "unreadable tokenizer": (["--tokenizer", "/nonexistent/tokenizer.json"], "does not exist"),
    "zero max length": (["--max-length", "0"], "--max-length"),
    "negative batch size": (["--batch-size", "-2"], "--batch-size"),
    "zero accumulation": (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
    "budget under one step": (["--total-tokens", "1e-9", "--max-steps", "-1"], "less than one step"),
    "zero max steps": (["--max-steps", "0"], "-1"),
    "negative learning rate": (["--learning-rate", "-1e-4"], "--learning-rate"),
    "zero cadence": (["--step-cadence", "0"], "--step-cadence"),
    "unknown model": (["--model", "gpt-17"], "unknown model config 'gpt-17'"),
    "missing model config file": (["--model-config", "/nonexistent/model.json"], "does not exist"),
    "unknown attention": (["--attn-implementation", "fast"], "invalid choice"),
    "missing flash-attn": (["--attn-implementation", "flash_attention_2"], "flash"),
    "init over existing checkpoints": (["--init-model"], "already holds checkpoints"),
    "unknown optimizer": (["--optimizer", "sgd"], "invalid choice"),
    "pipeline batch not divisible": (
        ["--pipeline", "--batch-size", "3", "--microbatch-scale", "2"],
        "stages_per_rank x microbatch_scale = 1 x 2",
    ),
    "unknown pipeline schedule": (["--pipeline", "--pipeline-schedule", "ScheduleFastest"], "is not a schedule"),
    "schedule the engine cannot run": (
        ["--pipeline", "--pipeline-engine", "deepspeed", "--pipeline-schedule", "ScheduleZBVZeroBubble"],
        "cannot run",
    ),
    "pipeline stages not dividing the world": (["--pipeline", "--pipeline-stages", "2"], "does not divide"),
    "pipeline stages without pipeline": (["--pipeline-stages", "2"], "only applies to --pipeline"),
    "compile around flash attention": (
        ["--compile", "--attn-implementation", "flash_attention_2"],
        "does not support --attn-implementation flash_attention_2",
    ),
    "compile with the pipeline": (["--pipeline", "--compile"], "--compile is not supported with --pipeline"),
    "pipeline outside a launcher": (["--pipeline"], "deepspeed --num_gpus"),
    "microbatch scale without pipeline": (["--microbatch-scale", "2"], "only applies to --pipeline"),
    "json without dry run": (["--json"], "only applies to --dry-run"),
    "anneal longer than the run": (["--anneal-steps", "50"], "--anneal-steps"),
    "init-from not a model": (["--init-from", "/tmp"], "no config.json"),
    "negative warmup": (["--warmup-steps", "-5"], "--warmup-steps"),
    "budget of 1e300 billion tokens": (["--total-tokens", "1e300"], "out of range"),
    "budget that plans 1e197 steps": (["--total-tokens", "1e200", "--max-steps", "-1"], "out of range"),
    "cooldown of 1e300 billion tokens": (["--min-cooldown-tokens", "1e300"], "out of range"),
    "learning rate that scales to inf": (["--learning-rate", "1.7e308"], "out of range"),
    "temperature that overflows the logits": (["--sample-temperature", "1e-300"], "out of range"),
    "repetition penalty that overflows": (["--repetition-penalty", "1e-300"], "out of range"),
    "pipeline schedule that does not exist, without --pipeline": (["--pipeline-schedule", "bogus"], "not a schedule"),
    "pipeline schedule without --pipeline": (["--pipeline-schedule", "GPipe"], "only applies to --pipeline"),
    "resume given --init-from (the checkpoint would win)": (["--init-from", "{out}/final"], "holds checkpoints"),
}
BARE_FLAGS = {"--dry-run", "--init-model", "--pipeline", "--compile", "--json"}
# --init-from folders: with --init-model --overwrite-output-dir on the trained dir, the most destructive form.
CASES |= {
    f"init-from {name.removeprefix('init-')}": (["--init-from", f"{{f}}/{name}", "--tokenizer", None], says)
    for name, says in {
        "init-bad-json": "config.json: Expecting property name",
        "init-no-config": "no config.json",
        "init-no-weights": "no model.safetensors",
        "init-truncated-weights": "damaged or truncated",
        "init-garbage-weights": "damaged or truncated",
        "init-wrong-shape": "do not match config.json",
        "init-zero-heads": "num_attention_heads must be >= 1",
        "init-string-size": "hidden_size must be an integer",
        "init-unknown-type": "model_type 'gpt2' is not supported",
    }.items()
}
CASES |= {  # an empty name is refused, not read as the default
    "empty init-from": (["--init-from", " "], "--init-from: is empty"),
    "empty tokenizer": (["--tokenizer", " "], "--tokenizer: is empty"),
    "empty model-config": (["--model-config", " "], "--model-config: is empty"),
    "empty lr spike": (["--inject-lr-spike", " "], "--inject-lr-spike: is empty"),
    "huge step cadence": (["--step-cadence", "1e307"], "--step-cadence"),
    "model-config with init-from": (
        ["--model-config", "tiny.json", "--init-from", "{out}/final"],
        "drop --model-config",
    ),
    "output dir inside a checkpoint": (["--output-dir", "{out}/checkpoints/checkpoint-3/run"], "inside the checkpoint"),
}
OVERWRITE = {name for name in CASES if name.startswith("init-from")}


def _argv(case: str, ws: dict) -> list[str]:
    extra, _ = CASES[case]
    paths = {k: str(v) for k, v in ws.items()}
    base = {"--dataset": "{corpus}", "--tokenizer": "{tok}", "--max-steps": "6", "--output-dir": "{out}"}
    items = iter(extra)
    for flag in items:
        base[flag] = "" if flag in BARE_FLAGS else next(items)  # None drops the flag, "" adds it bare
    argv = list(TINY)
    for flag, value in base.items():
        if value is not None:
            argv += [flag, value.format(**paths)] if value else [flag]
    if case in OVERWRITE:
        argv += ["--init-model", "--overwrite-output-dir"]
    return argv


def _main(argv: list[str], capfd) -> tuple[int, str, str]:
    """train.main in this process; stdout and stderr captured at the file descriptors (libraries included)."""
    try:
        code = train_script.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out = capfd.readouterr()
    return code, out.out, out.err


def _assert_one_line(code, err: str, says: str, context) -> None:
    assert code == 2, (context, err[-2000:])
    assert "Traceback" not in err, (context, err[-2000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (context, err)
    assert says in lines[0], (context, lines[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, ws, capfd):
    before = _digest(ws["out"])
    argv = _argv(case, ws)
    code, _, err = _main(argv, capfd)
    _assert_one_line(code, err, CASES[case][1], (case, argv))
    assert _digest(ws["out"]) == before, case


def test_a_run_without_its_own_tokenizer_needs_the_tokenizer_it_trained_with(ws, tmp_path, capfd):
    # A run keeps its tokenizer in tokenizer/, so a resume needs no --tokenizer; a copy without that folder (or one
    # saved before it was kept) gets the real cause, not "a different model".
    out = tmp_path / "copy"
    shutil.copytree(ws["out"], out)
    shutil.rmtree(out / "tokenizer")
    before = _digest(out)
    argv = [*TINY, "--dataset", str(ws["corpus"]), "--max-steps", "6", "--output-dir", str(out)]
    code, _, err = _main(argv, capfd)
    _assert_one_line(code, err, "no tokenizer/", argv)
    assert _digest(out) == before


def _numeric_options() -> list[argparse.Action]:
    return [a for a in train_script.build_parser()._actions if hasattr(a.type, "wanted")]


def test_every_numeric_option_declares_its_range():
    """No option is parsed by a bare int or float: each one's type states its range (lifecycle.checks.bounded)."""
    actions = train_script.build_parser()._actions
    assert [a.option_strings for a in actions if a.type in (int, float)] == []
    assert len(_numeric_options()) >= 25


def _hostile_values(action: argparse.Action) -> list[str]:
    t = action.type
    values = ["nan", "inf", "-inf", "1e400", "ten", ""]
    if t.low is not None:
        values.append(str(t.low - 1 if t.kind is int else -abs(t.low) - 1e-3))
    if t.above is not None:
        values.append(str(t.above))
    if t.high is not None:
        values.append(str(t.high + 1 if t.kind is int else t.high * 2 + 1))
    if t.kind is int:
        values += ["2.5", str(2**64)]
    return values


def test_every_numeric_option_refuses_nan_inf_and_out_of_range_values(ws, capfd):
    """For every numeric option: NaN, infinities, overflow, words, fractions for integers and values past each bound
    exit 2 with one line naming the option, before anything else happens."""
    before = _digest(ws["out"])
    count = 0
    for action in _numeric_options():
        for value in _hostile_values(action):
            argv = ["--output-dir", str(ws["out"]), f"{action.option_strings[-1]}={value}"]
            code, _, err = _main(argv, capfd)
            _assert_one_line(code, err, f"argument {action.option_strings[0]}", (action.dest, value))
            count += 1
    assert count >= 200
    assert _digest(ws["out"]) == before


def test_the_ranges_accept_their_bounds_and_sentinels():
    parse = train_script.parse_args
    args = parse(["--max-steps", "-1", "--rollback-lr-factor", "1", "--seed", str(2**32 - 1), "--weight-decay", "0"])
    assert (args.max_steps, args.rollback_lr_factor, args.seed, args.weight_decay) == (-1, 1.0, 2**32 - 1, 0.0)
    args = parse(["--sample-temperature", "0", "--sample-top-k", "0", "--max-grad-norm", "0", "--warmup-steps", "0"])
    assert (args.sample_temperature, args.sample_top_k, args.max_grad_norm, args.warmup_steps) == (0.0, 0, 0.0, 0)
    assert math.isclose(parse(["--learning-rate", "1e-300"]).learning_rate, 1e-300)


# -----------------------------------------------------------------------------
# The real command line, in subprocesses (the in-process cases above share its code)

SUBPROCESS_CASES = [
    "weight decay NaN",
    "invalid JSON on line 500",
    "config zero-heads",
    "output dir read-only",
    "batch size 10^7",
    "init-from truncated-weights",
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_on_the_real_command_line(case, ws):
    before = _digest(ws["out"])
    out = train(*_argv(case, ws), timeout=300)
    _assert_one_line(out.returncode, out.stderr, CASES[case][1], case)
    assert _digest(ws["out"]) == before


# -----------------------------------------------------------------------------
# Job control


@pytest.fixture
def jobs_dir():
    base = Path(tempfile.mkdtemp(prefix="jobs-", dir="/tmp"))  # Unix socket paths must stay short
    yield base / "jobs"
    shutil.rmtree(base, ignore_errors=True)


def test_an_empty_job_id_never_picks_the_only_running_job(jobs_dir, capsys):
    job = JobControl(Path("out"), "only", jobs_dir=jobs_dir)
    try:
        for name in ("", "  "):
            code = control.main(["--jobs-dir", str(jobs_dir), "save", name])
            err = capsys.readouterr().err
            _assert_one_line(code, err, "job id is empty", name)
        assert job.poll() is None  # nothing was sent
    finally:
        job.close()


def test_stale_registrations_are_removed_when_the_next_job_starts(jobs_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = JobControl(Path("out"), "first", jobs_dir=jobs_dir)
    stale = {**first.info, "job_id": f"gone-{dead.pid}", "pid": dead.pid, "socket": str(jobs_dir / "gone.sock")}
    first.close()
    (jobs_dir / f"gone-{dead.pid}.json").write_text(json.dumps(stale))
    (jobs_dir / "gone.sock").touch()
    job = JobControl(Path("out"), "next", jobs_dir=jobs_dir)  # no list command in between
    try:
        assert sorted(p.name for p in jobs_dir.iterdir()) == [f"{job.job_id}.json", f"{job.job_id}.sock"]
        assert [info["job_id"] for info in list_jobs(jobs_dir, clean=False)] == [job.job_id]
    finally:
        job.close()


def test_a_jobs_dir_with_the_wrong_mode_is_one_line(jobs_dir, ws, capfd, monkeypatch):
    jobs_dir.mkdir(mode=0o755)
    os.chmod(jobs_dir, 0o755)
    code = control.main(["--jobs-dir", str(jobs_dir), "list"])
    _assert_one_line(code, capfd.readouterr().err, "chmod 700", "control list")
    # train.py checks it up front, before building anything (the job registers only once training starts).
    before = _digest(ws["out"])
    monkeypatch.setenv("SMALL_LLM_JOBS_DIR", str(jobs_dir))
    argv = [*TINY, "--dataset", str(ws["corpus"]), "--tokenizer", str(ws["tok"]), "--output-dir", str(ws["out"])]
    code, _, err = _main([*argv, "--max-steps", "6"], capfd)
    _assert_one_line(code, err, "accessible to other users", "train.py")
    assert _digest(ws["out"]) == before


def test_control_command_line_with_an_empty_job_id(jobs_dir):
    job = JobControl(Path("out"), "only", jobs_dir=jobs_dir)
    try:
        cmd = [PYTHON, "-m", "lifecycle.control", "--jobs-dir", str(jobs_dir), "save", ""]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        _assert_one_line(out.returncode, out.stderr, "job id is empty", "subprocess")
        assert job.poll() is None
    finally:
        job.close()


# -----------------------------------------------------------------------------
# A bad line found mid-stream (streams read records lazily, so it can only surface during training)


def test_a_bad_line_deep_in_a_stream_is_one_data_error_naming_file_and_line(ws):
    import data
    from data.sources import open_source

    mix = data.parse_mix(str(ws["f"] / "deep-line.jsonl"))
    tok = data.load_tokenizer(ws["tok"])
    stream = data.PackedStream(mix, tok, 64, 2, seed=3, open_fn=lambda spec: open_source(spec, streaming=True))
    with pytest.raises(data.DataError, match=r"deep-line\.jsonl:500: invalid JSON"):
        for _ in range(10_000):  # a row takes a few documents: line 500 comes within a few hundred batches
            next(stream)


def test_train_main_reports_a_data_error_raised_mid_run_as_one_line(ws, capfd, monkeypatch):
    """What train.main does with a DataError from the data stream after training started: exit 2, one line."""
    import data
    from parallel import DataParallel

    def bad_step(self, meter):
        raise data.DataError(f"{ws['f'] / 'deep-line.jsonl'}:500: invalid JSON (Expecting value at column 2)")

    monkeypatch.setattr(DataParallel, "train_step", bad_step)
    new = ws["root"] / "mid-run"
    argv = [*TINY, "--dataset", str(ws["corpus"]), "--tokenizer", str(ws["tok"]), "--max-steps", "2"]
    code, _, err = _main([*argv, "--init-model", "--output-dir", str(new), "--sample-tokens", "0"], capfd)
    _assert_one_line(code, err, "deep-line.jsonl:500", "mid-run")
    assert not (new / "checkpoints").exists() or not any((new / "checkpoints").iterdir())
