"""The README is the manual: every option of train.py and every preset of run.sh must be documented in it."""

import re

import train
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_train_option_is_in_the_readme():
    hidden = {"--local_rank", "--local-rank", "--help"}
    options = [s for a in train.build_parser()._actions for s in a.option_strings if s.startswith("--")]
    missing = [o for o in options if o not in hidden and f"`{o}" not in README]
    assert not missing, f"README does not document {missing}"


def test_every_preset_is_in_the_readme():
    presets = re.findall(r"^  ([a-z_]+)\)$", (ROOT / "run.sh").read_text(), flags=re.M)
    assert "demo" in presets and "default" in presets
    missing = [p for p in presets if f"`{p}`" not in README]
    assert not missing, f"README does not document the presets {missing}"


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)
    assert len(commands) == 2 and "./run.sh demo" in commands[0]
    test_command = commands[1].split("&& ")[-1].replace(".venv/bin/python", "").strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
