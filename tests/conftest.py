"""Shared test fixtures: repository paths and the optional ../shared sample data."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Tests import the helper packages (models, data, schedule, monitor) from the repository root.
sys.path.insert(0, str(ROOT))
# Keep every test offline and single-threaded enough for a 2-core CI machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder of sample data; tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (sample data is only present in the development checkout)")
    return SHARED
