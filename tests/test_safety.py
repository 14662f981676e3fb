"""Ways a run could lose or corrupt data, each reproduced on a tiny real run (single process, CPU)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY, train, write_corpus


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    import data

    root = tmp_path_factory.mktemp("safety")
    corpus = write_corpus(root / "docs.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), root / "tokenizer")
    return [*TINY, "--dataset", str(corpus), "--tokenizer", str(root / "tokenizer")]


def _log(output_dir: Path) -> list[dict]:
    (run_dir,) = (output_dir / "runs").iterdir()
    return [json.loads(line) for line in (run_dir / "trainer_logs.jsonl").read_text().splitlines()]


def test_resuming_a_copied_output_dir_leaves_the_original_alone(data_args, tmp_path):
    original, copy = tmp_path / "A", tmp_path / "B"
    run = train(*data_args, "--init-model", "--max-steps", "6", "--output-dir", str(original))
    assert run.returncode == 0, run.stderr[-2000:]
    log_before = _log(original)
    shutil.copytree(original, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-6")
    resumed = train(*data_args, "--max-steps", "6", "--output-dir", str(copy))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _log(original) == log_before  # the resume wrote into the copy's own log
    assert [r["step"] for r in _log(copy) if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    state = json.loads((copy / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert not Path(state["run_dir"]).is_absolute()


def test_resume_refuses_when_no_checkpoint_verifies(data_args, tmp_path):
    out = tmp_path / "run"
    assert train(*data_args, "--init-model", "--max-steps", "3", "--output-dir", str(out)).returncode == 0
    weights = out / "checkpoints" / "checkpoint-3" / "model-0.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    before = weights.read_bytes()
    resumed = train(*data_args, "--max-steps", "6", "--output-dir", str(out))
    assert resumed.returncode == 2
    assert "checkpoint-3" in resumed.stderr and "--init-model --overwrite-output-dir" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert weights.read_bytes() == before  # nothing was written over the damaged checkpoint


def test_stop_on_a_nan_never_saves_nan_weights(data_args, tmp_path):
    out = tmp_path / "run"
    spike = ["--inject-lr-spike", "5,1e30", "--divergence-action", "stop", "--max-steps", "12"]
    run = train(*data_args, *spike, "--init-model", "--output-dir", str(out))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "not saving non-finite weights" in run.stdout
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert steps and max(steps) < 6  # the last finite state is the newest checkpoint
    for step in steps:
        tensors = load_file(out / "checkpoints" / f"checkpoint-{step}" / "model-0.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), step


@pytest.mark.parametrize("action", ["none", "rollback"])
def test_text_samples_never_crash_a_diverged_run(data_args, tmp_path, action):
    out = tmp_path / action
    spike = ["--inject-lr-spike", "5,1e30", "--divergence-action", action, "--max-steps", "8", "--sample-tokens", "8"]
    run = train(*data_args, *spike, "--init-model", "--output-dir", str(out))
    assert "Traceback" not in run.stderr and "probability tensor" not in run.stderr, run.stderr[-2000:]
    assert run.returncode == 0


# -----------------------------------------------------------------------------
# Starting over, sharing and editing an output dir or its inputs


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def six_step_dir(data_args, tmp_path_factory) -> Path:
    """A finished 6-step run (checkpoints at 3 and 6, final/); tests work on copies of it."""
    out = tmp_path_factory.mktemp("six") / "run"
    run = train(*data_args, "--init-model", "--max-steps", "6", "--output-dir", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def _copy(six_step_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(six_step_dir, out)
    return out


def test_init_model_overwrite_validates_everything_before_deleting(data_args, six_step_dir, tmp_path):
    out = _copy(six_step_dir, tmp_path)
    before = _files(out / "checkpoints") | _files(out / "tokenizer")
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(50)))
    args = [a if a != data_args[data_args.index("--dataset") + 1] else str(no_text) for a in data_args]
    run = train(*args, "--init-model", "--overwrite-output-dir", "--max-steps", "6", "--output-dir", str(out))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "text" in run.stderr
    assert _files(out / "checkpoints") | _files(out / "tokenizer") == before  # nothing deleted or replaced


def test_init_model_overwrite_trains_a_fresh_tokenizer(data_args, tmp_path):
    out = tmp_path / "run"
    args = [a for i, a in enumerate(data_args) if "--tokenizer" not in data_args[max(i - 1, 0) : i + 1]]
    first = train(*args, "--vocab-size", "512", "--init-model", "--max-steps", "3", "--output-dir", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]) == 512
    again = train(
        *args, "--vocab-size", "300", "--init-model", "--overwrite-output-dir", "--max-steps", "3",
        "--output-dir", str(out),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]) == 300
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["model_config"]["vocab_size"] == 300
    assert not (out / ".tmp-start").exists()
    assert not (out / ".replaced").exists()  # the first checkpoint of the new run deleted the old one


@pytest.mark.parametrize("action", ["stop", "none"])
def test_a_replacement_failing_before_its_first_checkpoint_puts_the_old_run_back(
    data_args, six_step_dir, tmp_path, action
):
    # The replacement passes every check at start, then fails in training, as a bad record deep in a streamed corpus
    # would: here it diverges at step 2, before the first save at step 3, and either stops or (action none) trains
    # on in NaNs to the end, where nothing may be saved or exported. The old run, its export and tokenizer stay.
    out = _copy(six_step_dir, tmp_path)
    before = _files(out / "checkpoints") | _files(out / "tokenizer") | _files(out / "final")
    args = [a for i, a in enumerate(data_args) if "--tokenizer" not in data_args[max(i - 1, 0) : i + 1]]
    spike = ["--inject-lr-spike", "1,1e30", "--divergence-action", action, "--vocab-size", "300"]
    run = train(*args, *spike, "--init-model", "--overwrite-output-dir", "--max-steps", "6", "--output-dir", str(out))
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    if action == "stop":
        assert run.returncode == 1 and "stop at step 2" in run.stdout  # before any save
    else:
        assert run.returncode == 0 and "not saving non-finite weights" in run.stdout
        assert "not exporting non-finite weights" in run.stdout
    assert "the run this one replaced is back" in run.stdout
    assert _files(out / "checkpoints") | _files(out / "tokenizer") | _files(out / "final") == before
    assert not (out / ".replaced").exists()
    # python -m monitor on the output dir reads the old run's log, not the newer one the dead start left
    from monitor.logs import resolve_log_file

    named = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["run_dir"]
    assert len(list((out / "runs").iterdir())) == 2 and sorted((out / "runs").iterdir())[-1].name != Path(named).name
    assert resolve_log_file(out) == out / named / "trainer_logs.jsonl"
    resumed = train(*data_args, "--max-steps", "9", "--output-dir", str(out))  # the old run goes on as before
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def test_a_kill_before_the_replacements_first_checkpoint_keeps_the_old_run(data_args, six_step_dir, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.helpers import PYTHON, ROOT

    out = _copy(six_step_dir, tmp_path)
    before = _files(out / "checkpoints")
    env = os.environ | {"OMP_NUM_THREADS": "1", "SMALL_LLM_JOBS_DIR": str(tmp_path / "jobs")}
    late_saves = ["--step-cadence", "1", "--max-steps", "100000"]  # the first save is thousands of steps away
    cmd = [PYTHON, str(ROOT / "train.py"), *data_args, *late_saves, "--init-model", "--overwrite-output-dir"]
    proc = subprocess.Popen(
        [*cmd, "--output-dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        for line in proc.stdout:  # the step-0 eval: the old run is set aside, training begins
            if line.startswith("step 0 | eval loss"):
                break
            assert time.time() < deadline
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("checkpoint-*"))
    assert _files(out / ".replaced" / "checkpoints") == before  # the kill landed in the window

    for again in ([], ["--init-model", "--overwrite-output-dir"]):  # neither a resume nor a new start goes on
        refused = train(*data_args, "--max-steps", "9", *again, "--output-dir", str(out))
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert refused.stderr.count("\n") == 1 and ".replaced holds the run" in refused.stderr
        assert _files(out / ".replaced" / "checkpoints") == before

    assert (out / ".replaced" / "final" / "model.safetensors").is_file()  # the old export is aside too
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    os.rename(out / ".replaced" / "checkpoints", out / "checkpoints")  # half a repair: the export is still aside
    refused = train(*data_args, "--max-steps", "9", "--output-dir", str(out))
    assert refused.returncode == 2 and ".replaced holds the run" in refused.stderr, refused.stderr[-2000:]
    assert (out / ".replaced" / "final" / "model.safetensors").is_file()  # a refused start deletes nothing

    for item in (out / ".replaced").iterdir():  # the rest of the repair, as the message says
        if item.name != "replaced-by.json":
            shutil.rmtree(out / item.name, ignore_errors=True)
            os.rename(item, out / item.name)
    shutil.rmtree(out / ".replaced")
    resumed = train(*data_args, "--max-steps", "9", "--output-dir", str(out))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def test_a_kill_after_the_replacements_first_checkpoint_finishes_the_deletion(data_args, six_step_dir, tmp_path):
    out = _copy(six_step_dir, tmp_path)  # as a kill between the first save and deleting the set-aside run leaves it
    (out / ".replaced" / "checkpoints" / "checkpoint-40").mkdir(parents=True)
    start = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["start_id"]
    (out / ".replaced" / "replaced-by.json").write_text(json.dumps({"start_id": "another start"}))
    refused = train(*data_args, "--max-steps", "9", "--output-dir", str(out))  # not the replacer's checkpoint
    assert refused.returncode == 2 and ".replaced holds the run" in refused.stderr, refused.stderr[-2000:]
    assert (out / ".replaced" / "checkpoints" / "checkpoint-40").is_dir()
    (out / ".replaced" / "replaced-by.json").write_text(json.dumps({"start_id": start}))
    resumed = train(*data_args, "--max-steps", "9", "--output-dir", str(out))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert not (out / ".replaced").exists()


@pytest.mark.parametrize("name", ["checkpoints", "final"])
def test_a_linked_run_folder_is_not_replaced(data_args, six_step_dir, tmp_path, name):
    out = _copy(six_step_dir, tmp_path)
    elsewhere = tmp_path / f"big-volume-{name}"
    os.rename(out / name, elsewhere)
    (out / name).symlink_to(elsewhere)
    before = _files(elsewhere)
    run = train(*data_args, "--init-model", "--overwrite-output-dir", "--max-steps", "3", "--output-dir", str(out))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "is a link" in run.stderr, run.stderr[-2000:]
    assert (out / name).is_symlink() and _files(elsewhere) == before and not (out / ".replaced").exists()


def test_one_run_per_output_dir_and_a_dead_holder_is_taken_over(data_args, six_step_dir, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import time

    from tests.helpers import PYTHON, ROOT

    out = _copy(six_step_dir, tmp_path)
    env = os.environ | {"OMP_NUM_THREADS": "1", "SMALL_LLM_JOBS_DIR": str(tmp_path / "jobs")}
    holder = subprocess.Popen(
        [PYTHON, str(ROOT / "train.py"), *data_args, "--max-steps", "100000", "--output-dir", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while str(holder.pid) not in ((out / "run.lock").read_text() if (out / "run.lock").exists() else ""):
            assert holder.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = train(*data_args, "--max-steps", "100000", "--output-dir", str(out), env={"SMALL_LLM_JOBS_DIR": ""})
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"pid {holder.pid} on {socket.gethostname()}" in second.stderr
        fresh = train(*data_args, "--init-model", "--overwrite-output-dir", "--output-dir", str(out))
        assert fresh.returncode == 2 and "in use by another run" in fresh.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert str(holder.pid) in (out / "run.lock").read_text()  # the dead holder's name is still in the file
    taken_over = train(*data_args, "--max-steps", "8", "--output-dir", str(out))
    assert taken_over.returncode == 0, taken_over.stderr[-2000:]


def test_a_kill_inside_the_export_leaves_the_previous_export_loadable(six_step_dir, tmp_path):
    import subprocess

    from transformers import AutoModelForCausalLM

    from tests.helpers import PYTHON, ROOT

    out = _copy(six_step_dir, tmp_path)
    before = _files(out / "final")
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from lifecycle.outdir import publish_dir
with publish_dir(Path({str(out / "final")!r})) as folder:
    (folder / "config.json").write_text("")  # a half-written export
    assert Path({str(out / ".tmp-final")!r}).is_dir()
    os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr  # the kill landed inside the write
    assert _files(out / "final") == before
    AutoModelForCausalLM.from_pretrained(out / "final")
    from lifecycle.outdir import STAGING_MARK, recover_published

    assert (out / ".tmp-final" / STAGING_MARK).is_file()  # the killed write's staging folder, marked as ours
    recover_published(out / "final")
    assert not (out / ".tmp-final").exists()
    # the fallback's in-between state (previous export marked and moved aside, the new one not yet in place) is
    # repaired at start
    (out / "final" / STAGING_MARK).touch()
    (out / "final").rename(out / ".old-final")
    recover_published(out / "final")
    assert _files(out / "final") == before and not (out / ".old-final").exists()


def test_staging_names_held_by_others_are_refused_never_deleted(tmp_path):
    """A .tmp-NAME or .old-NAME this tool did not make (a folder, a file, a link) and a NAME that is a link are
    refused with one line and left as they are; what publish_dir does make leaves no mark in what it publishes."""
    from lifecycle.outdir import NotOurs, publish_dir

    dest, target = tmp_path / "out", tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with publish_dir(dest) as folder:
        (folder / "a.txt").write_text("1")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    with publish_dir(dest) as folder:  # a replacement: the previous folder set aside, then removed
        (folder / "b.txt").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"] and (dest / "b.txt").is_file()
    for name, make in [
        (".tmp-out", lambda p: (p.mkdir(), (p / "user.txt").write_text("u"))),
        (".old-out", lambda p: (p.mkdir(), (p / "user.txt").write_text("u"))),
        (".tmp-out", lambda p: p.write_text("a file")),
        (".old-out", lambda p: p.symlink_to(target)),
    ]:
        make(tmp_path / name)
        with pytest.raises(NotOurs, match="not made by this tool"), publish_dir(dest) as folder:
            (folder / "c.txt").write_text("3")
        assert os.path.lexists(tmp_path / name) and (target / "keep.txt").read_text() == "mine"
        assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
        path = tmp_path / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    linked = tmp_path / "linked"
    linked.symlink_to(target)
    with pytest.raises(NotOurs, match="is a link"), publish_dir(linked) as folder:
        (folder / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_export_leaves_a_users_staging_named_folder_alone(six_step_dir, tmp_path):
    from tests.helpers import PYTHON, ROOT

    theirs = tmp_path / ".tmp-hf"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    cmd = [PYTHON, str(ROOT / "export.py"), str(six_step_dir / "checkpoints" / "checkpoint-6"), str(tmp_path / "hf")]
    import subprocess

    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not made by this tool" in result.stderr
    assert (theirs / "notes.txt").read_text() == "mine" and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("product", ["final", "tokenizer"])
def test_a_linked_export_folder_is_refused_at_start(data_args, six_step_dir, tmp_path, product):
    out = _copy(six_step_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / product, elsewhere)
    (out / product).symlink_to(elsewhere)
    before = _files(elsewhere)
    result = train(*data_args, "--max-steps", "8", "--output-dir", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{out / product} is a link" in result.stderr
    assert _files(elsewhere) == before and not (out / "checkpoints" / "checkpoint-8").exists()


def test_a_finished_run_without_checkpoints_is_never_replaced_silently(data_args, tmp_path):
    out = tmp_path / "explore"
    first = train(*data_args, "--init-model", "--max-steps", "2", "--save-strategy", "no", "--output-dir", str(out))
    assert first.returncode == 0 and (out / "final").is_dir(), first.stderr[-2000:]
    before = _files(out / "final")
    again = train(*data_args, "--init-model", "--max-steps", "2", "--save-strategy", "no", "--output-dir", str(out))
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    resumed = train(*data_args, "--max-steps", "4", "--output-dir", str(out))
    assert resumed.returncode == 2 and "no checkpoint to resume" in resumed.stderr
    assert _files(out / "final") == before


def test_a_same_size_edit_of_the_data_is_noticed_on_resume(data_args, tmp_path):
    corpus = Path(data_args[data_args.index("--dataset") + 1])
    edited = tmp_path / "docs.jsonl"
    shutil.copy(corpus, edited)
    args = [str(edited) if a == str(corpus) else a for a in data_args]
    out = tmp_path / "run"
    assert train(*args, "--init-model", "--max-steps", "3", "--output-dir", str(out)).returncode == 0
    text = edited.read_text()
    i = text.index(" the ")
    edited.write_text(text[:i] + " THE " + text[i + 5 :])  # same size, different documents
    assert edited.stat().st_size == corpus.stat().st_size
    resumed = train(*args, "--max-steps", "6", "--output-dir", str(out))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "different data" in resumed.stderr and "--no-restore-dataset-state" in resumed.stderr


def test_a_changed_tokenizer_is_refused_on_resume_unless_asked(data_args, six_step_dir, tmp_path):
    import data

    out = _copy(six_step_dir, tmp_path)
    corpus = Path(data_args[data_args.index("--dataset") + 1])
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][::-1][:800]
    data.save_tokenizer(data.train_tokenizer(texts, vocab_size=512), tmp_path / "other")
    args = [str(tmp_path / "other") if a == data_args[data_args.index("--tokenizer") + 1] else a for a in data_args]
    steps = ["--max-steps", "8"]
    refused = train(*args, *steps, "--no-restore-dataset-state", "--output-dir", str(out))
    assert refused.returncode == 2 and "--allow-tokenizer-change" in refused.stderr, refused.stderr[-2000:]
    own = train(
        *[a for a in args if a not in ("--tokenizer", str(tmp_path / "other"))], *steps, "--output-dir", str(out)
    )
    assert own.returncode == 0, own.stderr[-2000:]  # without --tokenizer a run resumes with its own
    allowed = train(
        *args, "--max-steps", "10", "--no-restore-dataset-state", "--allow-tokenizer-change", "--output-dir", str(out)
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    from data.tokenizer import tokenizer_hash

    assert tokenizer_hash(data.load_tokenizer(out / "tokenizer")) == tokenizer_hash(
        data.load_tokenizer(tmp_path / "other")
    )


def test_changed_batch_is_said_and_changed_optimizer_refused(data_args, six_step_dir, tmp_path):
    out = _copy(six_step_dir, tmp_path)
    before = _files(out / "checkpoints")
    other = train(*data_args, "--optimizer", "adafactor", "--max-steps", "8", "--output-dir", str(out))
    assert other.returncode == 2 and "Traceback" not in other.stderr and other.stderr.count("\n") == 1
    assert "--optimizer adamw" in other.stderr
    assert _files(out / "checkpoints") == before
    bigger = train(*data_args, "--batch-size", "8", "--max-steps", "8", "--output-dir", str(out))
    assert bigger.returncode == 0, bigger.stderr[-2000:]
    (line,) = [x for x in bigger.stderr.splitlines() if x.startswith("resume: changed")]
    assert "--batch-size 4 -> 8" in line and "peak LR" in line
    # a longer context continues the data at its next token (data/stream.py), said like any other change
    longer = train(
        *data_args, "--batch-size", "8", "--max-length", "128", "--max-steps", "10", "--output-dir", str(out)
    )
    assert longer.returncode == 0, longer.stderr[-2000:]
    (line,) = [x for x in longer.stderr.splitlines() if x.startswith("resume: changed")]
    assert "--max-length 64 -> 128" in line
    records = [json.loads(x) for x in next((out / "runs").iterdir()).joinpath("trainer_logs.jsonl").open()]
    tokens = {r["step"]: r["tokens"] for r in records if r["type"] == "train"}
    assert tokens[10] - tokens[8] == 2 * 8 * 128  # two steps of 8 rows of 128 tokens


def test_signals_stop_cleanly_once_at_once_twice_and_before_the_loop(data_args, six_step_dir, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.helpers import PYTHON, ROOT

    out = _copy(six_step_dir, tmp_path)
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o700)
    env = os.environ | {"OMP_NUM_THREADS": "1", "SMALL_LLM_JOBS_DIR": str(jobs)}

    def start(*extra: str) -> subprocess.Popen:
        cmd = [PYTHON, str(ROOT / "train.py"), *data_args, *extra, "--output-dir", str(out)]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Twice inside the loop: the second signal ends the run at once, with one line and no registration left.
    proc = start("--max-steps", "100000")
    deadline = time.time() + 120
    while not list(jobs.glob("*.json")):  # registered: the loop is about to start
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 143) and "Traceback" not in err, err[-2000:]  # 128 + the second signal handled
    assert "stopped at once by a second stop signal" in err
    assert not list(jobs.iterdir())  # socket and registration removed

    # Before the loop (while resolving and building): one line, 130, no traceback, nothing written.
    def complete() -> dict:  # a staging folder the first run's last signal cut short is cleared at the next start
        return {k: v for k, v in _files(out / "checkpoints").items() if not k.startswith(".tmp-")}

    before = complete()
    proc = start("--max-steps", "100000")
    proc.stdout.readline()  # the start has printed its first line: the imports are done, the loop not begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "before training started" in err
    assert complete() == before and not list(jobs.iterdir())


def test_rollback_past_a_bad_checkpoint_and_never_resume_the_abandoned_history(data_args, tmp_path):
    # An LR x 1e30 update leaves finite weights so large that every later gradient overflows; saved every step, the
    # checkpoint right after the spike is itself bad. The guard goes one checkpoint further back, and the abandoned
    # checkpoints are removed at once, so the step is saved again from the new history.
    out = tmp_path / "run"
    spike = ["--inject-lr-spike", "6,1e30", "--divergence-action", "rollback", "--step-cadence", "0.0002"]
    run = train(*data_args, *spike, "--max-steps", "9", "--init-model", "--output-dir", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    targets = [r["to"] for r in _log(out) if r.get("type") == "event" and r.get("event") == "rollback"]
    assert [Path(t).name for t in targets] == ["checkpoint-6", "checkpoint-5"], targets
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["rollbacks"] == 2  # written after the second rollback, not the bad one kept
    tensors = load_file(out / "checkpoints" / "checkpoint-6" / "model-0.safetensors")
    assert max(float(t.abs().max()) for t in tensors.values()) < 1e3


def test_a_filesystem_without_locks_is_used_unlocked_not_refused(tmp_path, monkeypatch):
    import errno
    import fcntl

    from lifecycle.outdir import OutputDirLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # what some network filesystems answer
    lock = OutputDirLock(tmp_path).acquire()
    assert not lock.held and lock.unsupported == "No locks available"
    lock.release()


def test_a_run_lock_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path, capfd):
    """Anyone who can write the output dir could plant run.lock -> a file of the user's; it must not be emptied."""
    import train as train_script

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").symlink_to(victim)
    code = train_script.main(["--model", "tiny", "--dataset", "builtin", "--max-steps", "1", "--output-dir", str(out)])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "run.lock is a link" in err
    assert victim.read_text() == "keep me\n" and (out / "run.lock").is_symlink()
    from lifecycle.outdir import OutputDirBusy, OutputDirLock

    with pytest.raises(OutputDirBusy, match="is a link"):  # the lock itself never follows it either
        OutputDirLock(out).acquire()
    assert victim.read_text() == "keep me\n"


def test_a_full_disk_fails_the_save_in_one_line_and_gives_its_space_back(data_args, tmp_path):
    """A real full filesystem (a 16 MB tmpfs in a private mount namespace): checkpoint-3 fits, checkpoint-6 does not.
    The run exits 1 naming the newest complete checkpoint, its partial checkpoint is gone, and once there is space
    the resume finishes the run."""
    import shlex
    import subprocess

    from tests.helpers import PYTHON, ROOT

    mnt, out = tmp_path / "disk", tmp_path / "disk" / "run"
    mnt.mkdir()
    cmd = [PYTHON, str(ROOT / "train.py"), *data_args, "--max-steps", "6", "--output-dir", str(out)]
    script = f"""
mount -t tmpfs -o size=16m tmpfs {mnt} || exit 77
cd {ROOT}
{shlex.join(cmd + ["--init-model"])} > {tmp_path}/full.out 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc
ls -a {out}/checkpoints > {tmp_path}/after.ls
mount -o remount,size=64m {mnt}
{shlex.join(cmd)} > {tmp_path}/resume.out 2> {tmp_path}/resume.err; echo $? > {tmp_path}/resume.rc
"""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script], env=env)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if done.returncode == 77 or not (tmp_path / "full.rc").exists():
        pytest.skip("cannot mount a private tmpfs here")
    err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", err[-2000:]
    assert "Traceback" not in err and f"no space left on device in {out / 'checkpoints'}" in err
    assert "newest complete checkpoint:" in err and "checkpoint-3" in err.splitlines()[-1]
    assert (tmp_path / "after.ls").read_text().split() == [".", "..", "checkpoint-3"]  # no partial checkpoint-6
    resume_err = (tmp_path / "resume.err").read_text()
    assert (tmp_path / "resume.rc").read_text().strip() == "0", resume_err[-2000:]
    assert "resumed" in (tmp_path / "resume.out").read_text()


def test_a_resume_without_the_runs_tokenizer_asks_for_it(data_args, six_step_dir, tmp_path):
    """Only checkpoints/ copied: no tokenizer is trained anew (the embeddings would continue under other ids)."""
    out = _copy(six_step_dir, tmp_path)
    shutil.rmtree(out / "tokenizer")
    no_tokenizer = [a for i, a in enumerate(data_args) if "--tokenizer" not in data_args[i - 1 : i + 1]]
    refused = train(*no_tokenizer, "--max-steps", "8", "--output-dir", str(out))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "no tokenizer/" in refused.stderr and "--tokenizer" in refused.stderr
    assert not (out / "tokenizer").exists() and not (out / "checkpoints" / "checkpoint-8").exists()
    given = train(*data_args, "--max-steps", "8", "--output-dir", str(out))  # the run's own, checked by its hash
    assert given.returncode == 0, given.stderr[-2000:]


def _resign(checkpoint: Path, name: str) -> None:
    """Record a file's new hash in the checkpoint's COMPLETE marker, as an attacker with write access could."""
    from lifecycle.checkpoint import MARKER, _sha256

    marker = json.loads((checkpoint / MARKER).read_text())
    marker["files"][name] = _sha256(checkpoint / name)
    (checkpoint / MARKER).write_text(json.dumps(marker))


class _Planted:
    def __reduce__(self):  # what an unsafe unpickler would run
        return (os.system, ("touch PLANTED_BY_PICKLE",))


def test_an_optimizer_pickle_the_safe_loader_refuses_is_skipped_never_run(data_args, six_step_dir, tmp_path):
    """A verified checkpoint whose optimizer file holds code: never executed; the checkpoint is named damaged and the
    one before it resumes (the same run as resuming that one directly)."""
    import pickle

    out = _copy(six_step_dir, tmp_path)
    newest = out / "checkpoints" / "checkpoint-6"
    (newest / "optimizer-0.pt").write_bytes(pickle.dumps({"state": _Planted()}))
    _resign(newest, "optimizer-0.pt")
    result = train(*data_args, "--max-steps", "7", "--output-dir", str(out), env={"PWD": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "cannot be read safely" in result.stderr
    assert "resumed from" in result.stdout and "checkpoint-3 at step 3" in result.stdout
    assert not list(Path.cwd().glob("PLANTED_BY_PICKLE")) and not list(tmp_path.rglob("PLANTED_BY_PICKLE"))


def test_a_checkpoint_naming_a_log_folder_outside_the_run_is_refused(data_args, six_step_dir, tmp_path):
    out = _copy(six_step_dir, tmp_path)
    newest = out / "checkpoints" / "checkpoint-6"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["run_dir"].startswith("runs/")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "trainer_logs.jsonl").write_text('{"keep": 1}\n')
    state["run_dir"] = "../elsewhere"
    (newest / "trainer_state.json").write_text(json.dumps(state))
    _resign(newest, "trainer_state.json")  # so the checkpoint still verifies
    result = train(*data_args, "--max-steps", "8", "--output-dir", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'../elsewhere'" in result.stderr and "log folder" in result.stderr
    assert (tmp_path / "elsewhere" / "trainer_logs.jsonl").read_text() == '{"keep": 1}\n'


def _drop_a_tensor(checkpoint: Path, keep_none: bool = False) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / "model-0.safetensors")
    kept = {} if keep_none else dict(list(weights.items())[1:])
    save_file(kept, checkpoint / "model-0.safetensors")


def _edit_state(checkpoint: Path, name: str, edit) -> None:
    path = checkpoint / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


RESIGNED_DAMAGE = {  # each leaves every checksum matching (re-summed), and the contents wrong
    "trainer state is a list": ("trainer_state.json", lambda c: _edit_state(c, "trainer_state.json", lambda s: [])),
    "no data position": ("trainer_state.json", lambda c: _edit_state(c, "trainer_state.json", lambda s: {
        k: v for k, v in s.items() if k != "data_state"})),
    "another step": ("trainer_state.json", lambda c: _edit_state(c, "trainer_state.json", lambda s: s | {"step": 5})),
    "rank state without rng": ("rank-0.json", lambda c: _edit_state(c, "rank-0.json", lambda s: {"rng": 5})),
    "a weight missing": ("model-0.safetensors", _drop_a_tensor),
    "no weights at all": ("model-0.safetensors", lambda c: _drop_a_tensor(c, keep_none=True)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RESIGNED_DAMAGE))
def test_a_verified_checkpoint_with_bad_contents_is_damaged_and_the_older_one_resumes(case, six_step_dir, tmp_path):
    """Contents a run could not have written are damage, however the checksums read: the start skips that checkpoint
    with a warning and takes the previous one (as every rank decides alike, from the files)."""
    from lifecycle.checkpoint import latest_checkpoint, run_contents

    out = _copy(six_step_dir, tmp_path)
    newest = out / "checkpoints" / "checkpoint-6"
    name, damage = RESIGNED_DAMAGE[case]
    damage(newest)
    _resign(newest, name)
    warnings = []
    assert latest_checkpoint(out / "checkpoints", warn=warnings.append) == newest  # its files are whole
    found = latest_checkpoint(out / "checkpoints", warn=warnings.append, contents=run_contents)
    assert found == out / "checkpoints" / "checkpoint-3"  # as train.py decides
    assert len(warnings) == 1 and "checkpoint-6" in warnings[0], warnings


def test_a_linked_checkpoint_is_not_followed(six_step_dir, tmp_path):
    from lifecycle.checkpoint import latest_checkpoint

    out = _copy(six_step_dir, tmp_path)
    (out / "checkpoints" / "checkpoint-99").symlink_to(out / "checkpoints" / "checkpoint-3")
    warnings = []
    assert latest_checkpoint(out / "checkpoints", warn=warnings.append) == out / "checkpoints" / "checkpoint-6"
    assert "checkpoint-99" in warnings[0] and "a link" in warnings[0]


def test_a_resume_over_a_resigned_bad_trainer_state_takes_the_older_checkpoint(data_args, six_step_dir, tmp_path):
    out = _copy(six_step_dir, tmp_path)
    newest = out / "checkpoints" / "checkpoint-6"
    (newest / "trainer_state.json").write_text("[]")
    _resign(newest, "trainer_state.json")
    result = train(*data_args, "--max-steps", "7", "--output-dir", str(out))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "skipping damaged checkpoint" in result.stderr and "checkpoint-3 at step 3" in result.stdout
