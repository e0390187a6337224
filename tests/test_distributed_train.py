"""``lmzoo train --nproc 2`` end to end on CPU (gloo): FSDP2, tensor and pipeline parallel train the
same 5 steps as one process at the same global batch (losses read from the run's metrics.jsonl,
<= 1e-4 relative, float32), and their checkpoints load, and resume, in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import lmzoo
from lmzoo.cli.app import main

STEPS = 5
SETTINGS = [
    "--model=gpt2-debug", "--model.dropout=0.0", "--batch_size=2", "--global_batch=4", "--block_size=16",
    "--data_order=sequential", "--dtype=float32", "--threads=1", "--lr=1e-2", "--warmup_steps=1",
    f"--decay_steps={STEPS + 1}", "--eval_interval=1000", "--eval_iters=1", "--sample_tokens=0", "--progress=false",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prepared character-level data set shared by every run (no preparation inside the workers)."""
    from lmzoo.data import prepare

    root = tmp_path_factory.mktemp("dist_train")
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex jolly bears".split()
    gen = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (6000,), generator=gen))
    (root / "t.txt").write_text(text)
    prepare(str(root / "t.txt"), root / "data", tokenizer="char")
    return root


def _args(corpus, out: str, steps: int = STEPS) -> list[str]:
    return [*SETTINGS, f"--source={corpus / 't.txt'}", f"--data_dir={corpus / 'data'}", f"--out_dir={corpus / out}",
            f"--max_steps={steps}"]


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def reference(corpus):
    """One process: STEPS + 1 steps (the trajectory every layout must reproduce, and one step past a resume),
    and the model after STEPS steps (what every layout's checkpoint must hold)."""
    assert main(["train", *_args(corpus, "ref", STEPS + 1)]) == 0
    assert main(["train", *_args(corpus, "ref5")]) == 0
    return _losses(corpus / "ref"), lmzoo.load(corpus / "ref"), lmzoo.load(corpus / "ref5")


def _launch(corpus, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmzoo", "train", "--nproc", "2", *_args(corpus, mode), f"--parallel.mode={mode}"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=corpus)
    print(f"{mode}: {time.time() - t0:.1f}s, load average {os.getloadavg()}")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6) % 20).logits


@pytest.mark.parametrize("mode", ["fsdp", "tp", "pp"])
def test_two_processes_train_like_one_and_write_a_loadable_checkpoint(corpus, reference, mode):
    ref_losses, ref_model, ref5_model = reference
    _launch(corpus, mode)
    run = corpus / mode
    got = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # rank 0 alone logged: one row per step
    want = [ref_losses[s] for s in range(1, STEPS + 1)]
    assert want[-1] < want[0]
    torch.testing.assert_close(torch.tensor([got[s] for s in sorted(got)]), torch.tensor(want), rtol=1e-4, atol=0)
    # the gathered model.safetensors (FSDP2 all-gathered, TP rows un-grouped, PP stages joined) loads in one
    # process (lmzoo.load / lmzoo generate) and holds the weights one process reaches after the same steps
    ckpt = run / "ckpt-00000005"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "dcp" / ".metadata").is_file()
    assert json.loads((ckpt / "dcp" / "layout.json").read_text()) == {"mode": mode, "world_size": 2}
    one = lmzoo.load(run)
    assert one.config.n_head == ref5_model.config.n_head  # tp's per-rank head count is not what was saved
    torch.testing.assert_close(_logits(one), _logits(ref5_model), rtol=0, atol=1e-4)
    if mode == "fsdp":
        # the 2-rank sharded checkpoint resumes in 1 process (weights and AdamW moments from dcp/) and
        # takes the step the reference took
        assert main(["train", *_args(corpus, mode, STEPS + 1), "--resume"]) == 0
        resumed = _losses(run)[STEPS + 1]
        torch.testing.assert_close(resumed, ref_losses[STEPS + 1], rtol=1e-4, atol=0)
        torch.testing.assert_close(_logits(lmzoo.load(run)), _logits(ref_model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode,expect", [
    ("ddp", "global_batch 4 is not divisible by batch_size 2 x world size 3"),
    ("tp", "tensor parallel degree 3 must divide the attention heads"),
    ("pp", "3 pipeline stages need at least as many layers; the model has 2"),
])
def test_bad_layouts_are_one_line_and_exit_2_before_any_process_starts(corpus, capsys, mode, expect):
    t0 = time.time()
    rc = main(["train", "--nproc", "3", *_args(corpus, "bad"), f"--parallel.mode={mode}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err
    assert not (corpus / "bad").exists() and time.time() - t0 < 30


@pytest.mark.slow
def test_a_failing_rank_under_nproc_is_one_line_and_exit_1(corpus, reference):
    """Workers that fail (here: resuming an FSDP2 checkpoint under another TP degree) stop the job; the
    launcher adds one line after torchrun's report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "lmzoo", "train", "--nproc", "2"]
    first = subprocess.run([*launch, *_args(corpus, "fsdp-then-tp"), "--parallel.mode=fsdp"], capture_output=True,
                           text=True, timeout=300, env=env, cwd=corpus)
    assert first.returncode == 0, first.stderr[-3000:]
    cmd = [*launch, *_args(corpus, "fsdp-then-tp", STEPS + 2), "--resume", "--parallel.mode=tp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=corpus)
    assert r.returncode == 1
    assert "cannot resume" in r.stderr and "tensor parallel degree 2" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("lmzoo: error: distributed training failed")
