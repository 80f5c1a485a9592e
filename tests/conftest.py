"""Shared test fixtures. Tests run on CPU with tiny models; the real data lives in ../shared/data."""

import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_data_dir() -> Path | None:
    """`$LIVT_SHARED_DATA`, else `<repo>/../shared/data`; None when neither exists."""
    env = os.environ.get("LIVT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set LIVT_SHARED_DATA or place shared/data beside the repo")
    return path


@pytest.fixture
def one_thread():
    """One thread: on 2 cores shared with other jobs, 2-thread runs slow to a crawl (spin-waiting threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
