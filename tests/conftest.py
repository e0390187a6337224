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
    torch.set_num_threads(1)  # again: a test may have changed it
    yield


@pytest.fixture(scope="session")
def prepare_text(tmp_path_factory):
    """``prepare_text(text)`` -> a directory of ``text`` prepared with the char tokenizer (once per text)."""
    from lmzoo.data import prepare

    made: dict[str, Path] = {}

    def make(text: str) -> Path:
        if text not in made:
            d = tmp_path_factory.mktemp("text")
            (d / "corpus.txt").write_text(text)
            made[text] = prepare(str(d / "corpus.txt"), d / "prepared", tokenizer="char", progress=False)
        return made[text]

    return make


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
