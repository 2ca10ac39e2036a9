"""Shared test fixtures: where the shared corpora and eval files are, and a quiet torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCRATCHLM_SHARED", REPO.parent / "shared"))

try:  # tiny models run fastest single-threaded, and tests never oversubscribe the 2-core CI box
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def corpora_dir(shared_dir) -> Path:
    return shared_dir / "corpora"


@pytest.fixture(scope="session")
def eval_dir(shared_dir) -> Path:
    return shared_dir / "eval"
