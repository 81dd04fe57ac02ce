"""Shared test fixtures: paths to the golden fixtures and a deterministic torch setup."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The fused norm kernels (motion_adapters.fused_norm) then run in Triton's CPU interpreter. Triton reads this
    # once, when it is first imported, so it is set here, before any test module imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores
    yield


@pytest.fixture
def show1_fixture_dir() -> Path:
    path = SHARED / "fixtures" / "show1" / "tiny_base"
    if not path.exists():
        pytest.fail(f"golden fixture missing at {path}: the repository expects ../shared beside it")
    return path


@pytest.fixture
def show1_key_table() -> Path:
    return SHARED / "reference" / "show1_base_state_dict.tsv"


@pytest.fixture
def all_threads():
    """For tests that run the default cascade at its real size: every core, as a user's run has."""
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)
