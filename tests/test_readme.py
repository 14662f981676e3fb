"""The README is the manual and docs/ the reference: every option of train.py and every preset of run.sh is
documented in one of them, the README stays short, and its links lead somewhere."""

import re

import train
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
EVERYTHING = README + "".join(DOCS.values())


def test_every_train_option_is_documented():
    hidden = {"--local_rank", "--local-rank", "--help"}
    options = [s for a in train.build_parser()._actions for s in a.option_strings if s.startswith("--")]
    missing = [o for o in options if o not in hidden and f"`{o}" not in EVERYTHING]
    assert not missing, f"neither README.md nor docs/ documents {missing}"


def test_every_preset_is_in_the_readme():
    presets = re.findall(r"^  ([a-z_]+)\)$", (ROOT / "run.sh").read_text(), flags=re.M)
    assert "demo" in presets and "default" in presets
    missing = [p for p in presets if f"`{p}`" not in README]
    assert not missing, f"README does not document the presets {missing}"


def test_readme_is_a_short_manual_whose_links_resolve():
    assert len(README.splitlines()) <= 250
    for name, text in {"README.md": README, **{f"docs/{n}": t for n, t in DOCS.items()}}.items():
        base = ROOT if name == "README.md" else ROOT / "docs"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (base / target).exists(), f"{name} links to {target}, which does not exist"
    for doc in ("options.md", "parallelism.md", "checkpoints.md", "data.md", "evaluation.md", "results.md"):
        assert f"docs/{doc}" in README, f"README does not link docs/{doc}"


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)
    assert len(commands) == 2 and "./run.sh demo" in commands[0]
    test_command = commands[1].split("&& ")[-1].replace(".venv/bin/python", "").strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
