from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


# The test models are tiny: one thread is faster than two fighting over the cores (and the
# suite's subprocesses and the parent do not oversubscribe the 2-core CI machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shakespeare_path() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (only in the lmzoo workspace)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """tiny Shakespeare prepared with the char tokenizer (vocab 65), once per session."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (only in the lmzoo workspace)")
    from lmzoo.data import prepare

    return prepare(str(SHAKESPEARE), tmp_path_factory.mktemp("shakespeare") / "char", tokenizer="char",
                   progress=False)
