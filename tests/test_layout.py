"""The house keeps its shape: imports run downward only, models/ imports nothing of a run, the loop stays one
screen, and no function outside tests and benchmarks grows past 80 lines."""

import ast

from tests.conftest import ROOT

# Lower floors never import higher ones (a package may import itself).
FLOORS = {
    "console": -1,  # the ground floor: imports nothing of the project, so every package may use it
    "models": 0, "data": 0,
    "schedule": 1, "optim": 1,
    "lifecycle": 2,
    "monitor": 3,
    "parallel": 4,
    "train": 5, "eval": 5, "export": 5,
}  # fmt: skip


def project_files():
    """(path relative to the root, syntax tree) of every module outside tests/ and bench/."""
    paths = [ROOT / f"{name}.py" for name in FLOORS if (ROOT / f"{name}.py").is_file()]
    paths += [p for name in FLOORS if (ROOT / name).is_dir() for p in (ROOT / name).rglob("*.py")]
    for path in sorted(paths):
        yield path.relative_to(ROOT), ast.parse(path.read_text())


def imported_packages(tree: ast.AST) -> set[str]:
    """Every project package a module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & FLOORS.keys()


def test_imports_run_downward_only():
    upward = []
    for rel, tree in project_files():
        here = rel.parts[0].removesuffix(".py")
        upward += [
            f"{rel} imports {pkg}" for pkg in imported_packages(tree) if pkg != here and FLOORS[pkg] >= FLOORS[here]
        ]
    assert not upward, upward


def test_models_import_nothing_of_a_run():
    for rel, tree in project_files():
        if rel.parts[0] == "models":
            assert imported_packages(tree) <= {"models"}, f"{rel} imports {imported_packages(tree) - {'models'}}"


def test_the_loop_is_one_screen_and_train_py_stays_readable():
    source = (ROOT / "train.py").read_text()
    assert len(source.splitlines()) <= 550
    loop = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 <= 60
    nested = [n for n in ast.walk(loop) if n is not loop and isinstance(n, ast.FunctionDef | ast.Lambda)]
    assert not nested, "train() defines functions inside it"


def test_no_function_is_longer_than_a_screen(limit=80):
    long = []
    for rel, tree in project_files():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name != "build_parser":
                if node.end_lineno - node.lineno + 1 > limit:
                    long.append(f"{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
