"""The trainer: exact resume, atomic checkpoints, accumulation, signals, and the CLI main job."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.data import prepare
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.metrics import read_metrics
from lmzoo.train.schedule import lr_at

TEXT = "".join(
    f"{w} the quick brown fox {i} jumps over the lazy dog.\n" for i, w in enumerate(["alpha", "beta", "gamma"] * 400)
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(TEXT)
    return prepare(str(d / "corpus.txt"), d / "prepared", tokenizer="char")


def tiny_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model="gpt2-debug", model_args={"block_size": 32, "dropout": 0.1}, data_dir=str(data_dir),
        out_dir=str(out), batch_size=4, block_size=32, max_steps=12, eval_interval=6, eval_iters=2,
        warmup_steps=2, lr=3e-3, min_lr=3e-4, device="cpu", dtype="float32", progress=False, sample_tokens=0,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if r["kind"] == "train"}


def test_resume_continues_bit_identically(data_dir, tmp_path):
    n = 6
    full = Trainer(tiny_cfg(data_dir, tmp_path / "full", max_steps=2 * n, decay_steps=2 * n))
    full.train()
    # the same run, stopped after n steps, then resumed in a fresh Trainer for n more
    Trainer(tiny_cfg(data_dir, tmp_path / "split", max_steps=n, decay_steps=2 * n)).train()
    resumed = Trainer(tiny_cfg(data_dir, tmp_path / "split", max_steps=2 * n, decay_steps=2 * n, resume=True))
    assert resumed.step == n
    resumed.train()
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert a == b and len(a) == 2 * n  # bit-identical losses at every step
    for (k, v), (k2, v2) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_checkpoints_are_complete_and_pruned(data_dir, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_cfg(data_dir, out, ckpt_interval=2, keep_last=2)).train()
    ckpts = sorted(p.name for p in out.glob("ckpt-*"))
    assert ckpts == ["ckpt-00000010", "ckpt-00000012"]
    assert (out / "LATEST").read_text().strip() == "ckpt-00000012"
    assert not list(out.glob(".*tmp"))  # no temporary leftovers
    m = lmzoo.load(out)
    assert m.config.vocab_size == lmzoo.load(out / "best").config.vocab_size
    assert lmzoo.formats.checkpoint.load_tokenizer_of(out).decode([0, 1]) != ""


def test_gradient_accumulation_equals_one_large_batch(data_dir, tmp_path):
    torch.manual_seed(0)
    x = torch.randint(0, 20, (8, 32))
    y = torch.randint(0, 20, (8, 32))

    class Fixed:
        def __init__(self, b):
            self.b, self.i = b, 0

        def next_batch(self):
            s = slice(self.i * self.b, (self.i + 1) * self.b)
            self.i += 1
            return x[s], y[s]

        def state_dict(self):
            return {"i": self.i}

    params = []
    for batch, accum in ((8, 1), (2, 4)):
        cfg = tiny_cfg(data_dir, tmp_path / f"acc{accum}", batch_size=batch, grad_accum=accum, max_steps=1,
                       model_args={"block_size": 32, "dropout": 0.0}, eval_interval=0)
        torch.manual_seed(1)
        t = Trainer(cfg)
        t.train_loader = Fixed(batch)
        t.train()
        params.append(torch.cat([p.detach().flatten() for p in t.model.parameters()]))
    rel = (params[0] - params[1]).norm() / params[0].norm()
    assert rel <= 1e-5


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=100)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55) and lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(50, schedule="wsd", **kw) == 1.0 and lr_at(99, schedule="wsd", **kw) < 0.2
    assert lr_at(99, schedule="constant", **kw) == 1.0


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"lr": 0}, "lr must be positive"),
        ({"lr": -1e-3}, "lr must be positive"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"schedule": "linear"}, "schedule"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"bogus_key": 1}, "unknown key 'bogus_key'"),
    ],
)
def test_invalid_training_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(override)


def test_resume_refuses_another_architecture(data_dir, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_cfg(data_dir, out, max_steps=2, eval_interval=0)).train()
    with pytest.raises(CheckpointError, match="another architecture"):
        Trainer(tiny_cfg(data_dir, out, resume=True, model_args={"block_size": 32, "n_layer": 3}))


def test_block_size_larger_than_data_is_a_clear_error(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 20)
    d = prepare(str(tmp_path / "t.txt"), tmp_path / "p", tokenizer="char")
    with pytest.raises(lmzoo.LmzooError, match="block_size"):
        Trainer(tiny_cfg(d, tmp_path / "r", block_size=64, model_args={"block_size": 64}))


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "lmzoo", *args], capture_output=True, text=True, **kw)


def test_cli_trains_saves_and_generates(data_dir, tmp_path):
    out = tmp_path / "run"
    r = _cli(["train", f"--data_dir={data_dir}", f"--out_dir={out}", "--model=gpt2-debug", "--max_steps=15",
              "--batch_size=4", "--block_size=32", "--model.block_size=32", "--eval_interval=5", "--eval_iters=2",
              "--sample_tokens=20", "--progress=false", "--device=cpu"])
    assert r.returncode == 0, r.stderr
    assert "--- sample ---" in r.stdout and "val loss" in r.stdout
    g = _cli(["generate", "--checkpoint", str(out), "--prompt", "the ", "--max-new-tokens", "10", "--seed", "1"])
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("the ") and len(g.stdout) > len("the ")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--lr=-1"], "lr must be positive"),
        (["train", "--model=gpt9"], "unknown preset 'gpt9'"),
        (["train", "--model.n_embd=30", "--model=gpt2-debug"], "divisible by n_head"),
        (["train", "--max_steps=abc"], "max_steps: expected an integer"),
        (["generate", "--checkpoint", "/nonexistent/ckpt"], "no such checkpoint"),
        (["info", "gpt2-debug", "--n_head=3"], "divisible by n_head"),
        (["info", "gpt2-debug", "--n_kv_head=3"], "must be a multiple of n_kv_head"),
        (["train", "stray"], "unrecognized argument"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = _cli(args, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_from_truncated_checkpoint_is_a_clear_error(data_dir, tmp_path):
    m = lmzoo.build("gpt2-debug")
    lmzoo.save(m, tmp_path / "c")
    w = tmp_path / "c" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        lmzoo.load(tmp_path / "c")
    (tmp_path / "c" / "config.json").unlink()
    r = _cli(["generate", "--checkpoint", str(tmp_path / "c")])
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_sigterm_saves_a_checkpoint_and_exits_143(data_dir, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "lmzoo", "train", f"--data_dir={data_dir}", f"--out_dir={out}", "--model=gpt2-debug",
         "--max_steps=100000", "--batch_size=4", "--block_size=32", "--model.block_size=32", "--eval_interval=0",
         "--progress=false", "--sample_tokens=0", "--device=cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 5:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, stderr  # 143, as shells expect: `lmzoo train && next` stops
    assert "interrupted" in stdout
    step = int((out / "LATEST").read_text().strip().split("-")[1])
    assert step > 0 and lmzoo.load(out) is not None


def test_sigkill_at_random_moments_always_leaves_a_loadable_newest_checkpoint(data_dir, tmp_path):
    """Kill -9 at random moments (checkpointing every step, so kills land inside writes too)."""
    out = tmp_path / "run"
    rng = random.Random(0)
    args = [sys.executable, "-m", "lmzoo", "train", f"--data_dir={data_dir}", f"--out_dir={out}",
            "--model=gpt2-debug", "--max_steps=40", "--batch_size=4", "--block_size=32", "--model.block_size=32",
            "--eval_interval=0", "--ckpt_interval=1", "--keep_last=2", "--progress=false", "--sample_tokens=0",
            "--device=cpu", "--resume"]
    kills = 0
    for _ in range(4):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not list(out.glob("ckpt-*")) and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        lmzoo.load(out)  # the newest checkpoint always loads
        state = lmzoo.formats.checkpoint.load_train_state(lmzoo.formats.checkpoint.resolve(out))
        assert state["step"] >= 1
        if state["step"] == 40:  # this run finished before its kill: a further resume is refused
            break
    assert kills >= 1
    r = subprocess.run(args, capture_output=True, text=True)
    if state["step"] == 40:
        assert r.returncode == 2 and "reached step 40" in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 40
    assert lmzoo.formats.checkpoint.load_train_state(lmzoo.formats.checkpoint.resolve(out))["step"] == 40
