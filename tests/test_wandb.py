"""--wandb: a real run logs to an offline W&B run, read back from its `.wandb` file with wandb's own protobuf records:
the same scalars as trainer_logs.jsonl, the config, the text samples and events; a resume continues the same W&B run
without a step W&B would drop; bad values, a missing package and missing credentials exit 2 with one line."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

import train as train_script
from tests.helpers import ACCELERATE, PYTHON, ROOT, TINY, train, write_corpus


def wandb_env(tmp_path: Path, mode: str = "offline") -> dict[str, str]:
    """W&B in `mode`, its caches and settings under tmp_path (none in the user's home), no credentials."""
    home = tmp_path / "wandb-home"
    return {
        "WANDB_MODE": mode,
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "XDG_CACHE_HOME": str(home / "cache"),  # wandb-core's debug log
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_API_KEY": "",
        "WANDB_IDENTITY_TOKEN_FILE": "",
        "NETRC": str(home / "netrc"),
        "WANDB_DIR": "",
    }


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: wandb's `Record` protobufs in the LevelDB log framing that wandb writes
    (a 7-byte header `:W&B`, 0xBEE1, version 0; 32 KiB blocks of chunks: crc32, length, type, data)."""
    from wandb.proto.wandb_internal_pb2 import Record

    buf, records, pending = path.read_bytes(), [], b""
    assert buf[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    pos = 7
    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        data = buf[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding
            continue
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pending += data
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_wandb_run(path: Path) -> dict:
    """One `.wandb` file: its run id, project and name, its history rows ({key: value}) and its merged config."""
    run, rows, config = None, [], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return {"id": run.run_id, "project": run.project, "name": run.display_name, "rows": rows, "config": config}


def scalars_of(rows: list[dict]) -> list[tuple[int, dict]]:
    """(training step, {<type>/<field>: value}) of every row that holds scalars, in logged order."""
    kinds = ("train/", "eval/", "summary/")
    found = [(row["step"], {k: v for k, v in row.items() if k.startswith(kinds)}) for row in rows]
    return [(step, values) for step, values in found if values]


def expected_scalars(records: list[dict]) -> list[tuple[int, dict]]:
    """What the W&B rows must hold for jsonl records: numeric fields as `<type>/<field>`, as in TensorBoard."""
    out = []
    for r in records:
        if r["type"] in ("train", "eval", "summary"):
            fields = {k: v for k, v in r.items() if k not in ("type", "step", "time")}
            numeric = {f"{r['type']}/{k}": v for k, v in fields.items() if isinstance(v, int | float)}
            out.append((r["step"], numeric))
    return out


def samples_of(rows: list[dict], files: Path) -> list[tuple[int, str]]:
    """(step, text) of every `sample` table, read from the run's media files."""
    out = []
    for row in rows:
        if "sample/path" in row:
            table = json.loads((files / row["sample/path"]).read_text())
            assert table["columns"] == ["step", "text"]
            out += [tuple(r) for r in table["data"]]
    return out


def printed_samples(stdout: str) -> list[tuple[int, str]]:
    """(step, text) of the `step N | eval loss ... | sample: '...'` lines a run prints."""
    return [
        (int(s), ast.literal_eval(t)) for s, t in re.findall(r"^step (\d+) \| eval .*\| sample: (.+)$", stdout, re.M)
    ]


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trainer_logs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", max_docs=600)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    import data

    out = tmp_path_factory.mktemp("tokenizer")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), out)
    return out


def test_a_run_and_its_resume_log_the_jsonl_scalars_config_and_samples_to_one_wandb_run(
    corpus, tokenizer_dir, tmp_path
):
    out, env = tmp_path / "out", wandb_env(tmp_path)
    common = [*TINY, "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-dir", str(out)]
    first = train(*common, "--init-model", "--max-steps", "4", "--wandb", "proj/name", env=env)
    assert first.returncode == 0, first.stderr
    (run_dir,) = (out / "runs").iterdir()
    first_jsonl = read_jsonl(run_dir)
    # A process killed after logging step 4 but before saving it: the resume continues from checkpoint-3, and W&B
    # already holds rows for step 4.
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    shutil.rmtree(out / "final")
    second = train(*common, "--max-steps", "6", "--wandb", "proj/name", env=env)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "checkpoint-3" in second.stdout
    assert [p.name for p in (out / "runs").iterdir()] == [run_dir.name]  # the resume kept its log folder

    folders = sorted((run_dir / "wandb").glob("offline-run-*"))  # W&B's files default into the log folder
    assert len(folders) == 2, folders
    runs = [read_wandb_run(next(f.glob("run-*.wandb"))) for f in folders]
    saved = json.loads((run_dir / "wandb_run.json").read_text())
    assert runs[0]["id"] == runs[1]["id"] == saved["id"]  # the resume went into the same W&B run
    assert all((r["project"], r["name"]) == ("proj", "name") for r in runs)

    # W&B steps only grow across both attempts, so W&B drops nothing, though the training steps repeat 4.
    wandb_steps = [row["_step"] for r in runs for row in r["rows"]]
    assert wandb_steps == sorted(set(wandb_steps)) and saved["next_step"] > wandb_steps[-1]
    # Every scalar of the jsonl, in order: the first attempt's log, then the resume's records past checkpoint 3.
    resumed_jsonl = read_jsonl(run_dir)
    assert [r for r in resumed_jsonl if r["step"] <= 3] == [r for r in first_jsonl if r["step"] <= 3]
    assert scalars_of(runs[0]["rows"]) == expected_scalars(first_jsonl)
    assert scalars_of(runs[1]["rows"]) == expected_scalars([r for r in resumed_jsonl if r["step"] > 3])
    steps = [s for s, values in scalars_of(runs[1]["rows"]) if "train/loss" in values]
    assert steps == [4, 5, 6]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= set(
        scalars_of(runs[1]["rows"])[0][1]
    )
    assert {"eval/loss", "eval/perplexity", "eval/bits_per_byte"} <= {
        k for _, values in scalars_of(runs[1]["rows"]) for k in values
    }

    # The config is the run info of each start (the resume's changed --max-steps included).
    info = json.loads((run_dir / "run_info.json").read_text())
    assert {k: runs[1]["config"][k] for k in info} == info
    assert runs[0]["config"]["args"]["max_steps"] == 4 and runs[1]["config"]["args"]["max_steps"] == 6
    assert runs[1]["config"]["args"]["wandb"] == "proj/name" and "plan" in runs[1]["config"]

    # The text sample of every eval, as printed.
    for attempt, run, folder in ((first, runs[0], folders[0]), (second, runs[1], folders[1])):
        printed = printed_samples(attempt.stdout)
        assert len(printed) >= 3 and samples_of(run["rows"], folder / "files") == printed


def test_only_the_main_process_of_a_ddp_run_logs_to_wandb(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "ddp"
    run = train(*TINY, "--batch-size", "2", "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir), "--init-model",
                "--max-steps", "2", "--output-dir", str(out), "--wandb", "proj/ddp", env=wandb_env(tmp_path),
                launcher=ACCELERATE)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = (out / "runs").iterdir()
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # one W&B run, from rank 0
    assert (run.stdout + run.stderr).count("Tracking run with wandb") == 1
    logged = read_wandb_run(log)
    assert logged["config"]["world_size"] == 2
    assert scalars_of(logged["rows"]) == expected_scalars(read_jsonl(run_dir))


LOG_EVENTS = """
import sys
from pathlib import Path
from monitor.logs import RunLogger
from monitor.wandb_run import WandbRun

run_dir = Path(sys.argv[1])
with RunLogger(run_dir, tensorboard=False, wandb=WandbRun("unit", run_dir, {"args": {"seed": 7}})) as log:
    log.train(1, loss=2.5, lr=1e-3, note="not a number")
    log.event(1, "rollback", to="checkpoint-0", lr_factor=0.5)
    log.text("sample", "once upon a time", 1)
"""


def test_events_and_samples_reach_wandb_and_wandb_dir_is_honoured(tmp_path):
    """RunLogger's events (rollback, divergence, stage) and text samples become one-row tables; WANDB_DIR moves W&B's
    files out of the log folder."""
    run_dir = tmp_path / "runs" / "1"
    env = os.environ | wandb_env(tmp_path) | {"WANDB_DIR": str(tmp_path / "elsewhere")}
    out = subprocess.run([PYTHON, "-c", LOG_EVENTS, str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not (run_dir / "wandb").exists()
    (folder,) = (tmp_path / "elsewhere" / "wandb").glob("offline-run-*")
    run = read_wandb_run(next(folder.glob("run-*.wandb")))
    assert run["project"] == "unit" and run["config"]["args"] == {"seed": 7}
    assert scalars_of(run["rows"]) == [(1, {"train/loss": 2.5, "train/lr": 1e-3})]
    (events,) = [row for row in run["rows"] if "events/path" in row]
    table = json.loads((folder / "files" / events["events/path"]).read_text())
    assert table["columns"] == ["step", "event", "details"]
    assert [[s, e, json.loads(d)] for s, e, d in table["data"]] == [
        [1, "rollback", {"to": "checkpoint-0", "lr_factor": 0.5}]
    ]
    assert samples_of(run["rows"], folder / "files") == [(1, "once upon a time")]


@pytest.mark.parametrize(
    "value, says",
    [
        ("", "names no project"),
        ("/run", "names no project"),
        ("team/proj/run", "more than one '/'"),
        ("proj/", "empty run name"),
        ("a:b", "not a W&B project name"),
    ],
)
def test_bad_wandb_values_exit_2_with_one_line_when_parsed(value, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_script.main(["--wandb", value, "--output-dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "--wandb" in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_wandb_package_exits_2_with_how_to_install(tmp_path):
    hide = (
        "import runpy, sys; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    run = train(*TINY, "--dataset", "builtin", "--output-dir", str(tmp_path / "out"), "--wandb", "proj",
                launcher=[PYTHON, "-c", hide])  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        "error: argument --wandb: the wandb package is not installed; pip install wandb==0.31.0 (the version "
        "requirements.txt pins); see python train.py --help"
    )
    assert not (tmp_path / "out").exists()


def test_online_mode_without_an_api_key_exits_2_instead_of_prompting(tmp_path):
    run = train(*TINY, "--dataset", "builtin", "--output-dir", str(tmp_path / "out"), "--wandb", "proj",
                env=wandb_env(tmp_path, mode="online"), timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "no W&B API key" in line and "WANDB_API_KEY" in line and "WANDB_MODE=offline" in line
    assert not (tmp_path / "out").exists()


def test_without_wandb_nothing_of_wandb_is_imported():
    code = "import sys, train; train.parse_args(['--dry-run']); import monitor.watch; print('wandb' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
