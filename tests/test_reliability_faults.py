"""Faults and scale (docs/reliability.md sections 1, 2 and 6): kill -9 and exact resume, atomic
directory replacement, bounded memory in prepare and the loader, out-of-memory in a training step.

The long versions are benchmarks (benchmarks/crash_soak.py, prepare_memory.py, loader_memory.py);
these tests run the same code at small sizes, and the crash soak's reduced version under ``-m slow``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.cli.app import main as cli_main
from lmzoo.formats import checkpoint as ckpt
from lmzoo.formats.atomic import atomic_path, clean_stale, remove_tree
from lmzoo.models.gpt2 import GPT
from lmzoo.tokenizer import build_tokenizer
from lmzoo.train import train
from lmzoo.train.metrics import read_metrics

prep = importlib.import_module("lmzoo.data.prepare")  # the module (lmzoo.data.prepare is the function)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- 1. crash soak ---------------------------------------------------------------------------------
def test_killed_and_resumed_run_ends_bit_identical(tmp_path):
    """Two kill -9 during training, resumed each time: every checkpoint left equals the reference's
    at its step, and the final weights and optimizer state equal an uninterrupted run's."""
    report = _bench("crash_soak").soak(tmp_path, kills=2, steps=24, seed=3, window=0.2, log=lambda m: None)
    assert report["failures"] == [], report
    assert report["kills_tried"] >= 1 and report["kills_survived"] == report["kills_tried"], report
    assert report["bit_identical"] and report["final"] == "ckpt-00000024", report


@pytest.mark.slow
def test_crash_soak_reduced(tmp_path):
    report = _bench("crash_soak").soak(tmp_path, kills=5, steps=100, seed=1, log=lambda m: None)
    assert report["failures"] == [] and report["kills_tried"] == 5, report
    assert report["kills_survived"] == 5 and report["bit_identical"], report


def test_soak_check_notices_wrong_weights(tmp_path):
    """The soak's checker is not vacuous: a checkpoint with other weights than the reference is caught."""
    soak = _bench("crash_soak")
    ref, out = tmp_path / "ref", tmp_path / "run"
    m = lmzoo.build("gpt2-debug")
    ckpt.write_checkpoint(m, ref / "ckpt-00000001", train_state={"step": 1})
    with torch.no_grad():
        next(m.parameters()).add_(1e-6)
    ckpt.write_checkpoint(m, out / "ckpt-00000001", train_state={"step": 1})
    ckpt.mark_latest(out, "ckpt-00000001")
    ok, what = soak.check_run_dir(out, ref)
    assert not ok and "other weights" in what
    assert soak.check_run_dir(tmp_path / "nothing", ref)[0]  # no checkpoint yet: a clean refusal is fine


def test_atomic_directory_replace_and_stale_repair(tmp_path):
    d = tmp_path / "best"
    for text in ("one", "two"):
        with atomic_path(d) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (d / "f").read_text() == "two" and not list(tmp_path.glob(".*.tmp"))
    # a kill between the two renames of the non-Linux fallback: the old directory sits in the temp one
    stash = tmp_path / ".best.abc123.tmp"
    (stash / "payload").mkdir(parents=True)
    d.rename(stash / "old")
    # a kill inside remove_tree and one inside a file write leave hidden temp directories too
    (tmp_path / ".ckpt-00000001.x1.tmp" / "old").mkdir(parents=True)
    (tmp_path / ".LATEST.x2.tmp").mkdir()
    (tmp_path / ".LATEST.x2.tmp" / "payload").write_text("half")
    removed = clean_stale(tmp_path)
    assert len(removed) == 3 and not list(tmp_path.glob(".*.tmp"))
    assert (d / "f").read_text() == "two"  # the previous content is back
    assert not (tmp_path / "ckpt-00000001").exists()  # a deleted checkpoint stays deleted
    remove_tree(d)
    assert not d.exists() and not list(tmp_path.glob(".*"))


# -- 2. bounded memory -----------------------------------------------------------------------------
TRICKY = ["foo", "bar", "  indent", "\n", "\n\n", " \n", "don't", "x.", "é", "日本", "<|endoftext|>", "\t", " "]


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_encoding_in_parts_equals_encoding_whole(kind, monkeypatch):
    """prepare hands tokenizers parts of about PART_CHARS characters: the ids are exactly the whole text's."""
    rng = random.Random(0)
    text = "".join(rng.choice(TRICKY) + rng.choice(["", " ", "\n"]) for _ in range(6000))
    tok = build_tokenizer(kind, [text], vocab_size=400 if kind == "bpe" else None)
    monkeypatch.setattr(prep, "PART_CHARS", 40)
    monkeypatch.setattr(prep, "BATCH_CHARS", 500)
    parts = list(prep.split_text(text))
    assert "".join(parts) == text and len(parts) > 100
    got = prep._encode_chunk(tok, [(text, False, True)], np.uint32)[0]
    want = tok.encode(text) + ([tok.eos_id] if tok.eos_id is not None else [])
    assert got.tolist() == want


def test_prepare_memory_does_not_grow_with_the_input(tmp_path):
    """Peak RSS of `lmzoo prepare` (byte, one process) on 2 MB and 16 MB inputs: the same within 40 MB
    (an implementation holding the text and its ids as Python ints would need 100+ MB more)."""
    pm = _bench("prepare_memory")
    line = "".join(f"line {i} of words, some longer than others{'!' * (i % 7)}\n" for i in range(1000)).encode()
    peaks = []
    for mb in (2, 16):
        text = tmp_path / f"in{mb}.txt"
        text.write_bytes(line * (mb * 10**6 // len(line)))
        r = pm.run_measured(pm.prepare_cmd(text, tmp_path / f"out{mb}", "byte", workers=1), interval=0.02)
        assert r["rc"] == 0, r
        meta = json.loads((tmp_path / f"out{mb}" / "meta.json").read_text())
        assert meta["source_bytes"] == text.stat().st_size
        peaks.append(r["peak_rss_mb"])
    assert peaks[1] - peaks[0] < 40, peaks
    assert peaks[1] < pm.BOUND_MB, peaks


def test_loader_memory_does_not_grow_over_2000_batches(tmp_path):
    """A 64 MB shard, 2,000 random batches: lmzoo's loader stays flat; one long-lived memmap (the known
    failure, measured the same way) grows, so the measurement can see the leak."""
    lm = _bench("loader_memory")
    data = lm.write_shard(tmp_path / "data", 32 * 2**20)
    ours = lm.measure(data, 2000, batch_size=16, block_size=512)
    naive = lm.measure(data, 2000, batch_size=16, block_size=512, naive=True)
    assert ours["growth_mb"] < 8, ours
    assert naive["rss_mb"][-1] - ours["rss_mb"][-1] > 16, (ours, naive)


# -- 6. out of memory in a training step ---------------------------------------------------------
@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 21474836480 bytes"),
])
def test_out_of_memory_is_one_line_and_the_last_checkpoint_stays_valid(error, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    prep.prepare(str(corpus), tmp_path / "data", tokenizer="byte", progress=False)
    out = tmp_path / "run"
    calls = {"n": 0}
    forward = GPT.forward

    def failing_forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:  # the first micro-batch of step 6: checkpoints 2 and 4 exist
                raise error
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", failing_forward)
    code = cli_main([
        "train", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}",
        "--model=gpt2-debug", "--max_steps=20", "--batch_size=4", "--block_size=32", "--model.block_size=32",
        "--eval_interval=0", "--ckpt_interval=2", "--progress=false", "--sample_tokens=0", "--device=cpu",
        "--threads=1",
    ])
    err = capsys.readouterr().err.strip()
    assert code == 3, err
    assert err.count("\n") == 0 and err.startswith("lmzoo: error: out of memory on cpu in step 6 "), err
    assert "out of memory" in err and "micro-batch size 4" in err and "sequence length 32" in err
    assert "--batch_size=2 --grad_accum=2" in err and "ckpt-00000004 is intact" in err
    assert (out / "LATEST").read_text().strip() == "ckpt-00000004"
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]  # none after
    assert lmzoo.load(out) is not None and ckpt.load_train_state(ckpt.resolve(out))["step"] == 4
    assert read_metrics(out)[-1]["event"] == "error"


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(GPT, "forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train(
            source=str(corpus), tokenizer="byte", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
            model="gpt2-debug", max_steps=2, batch_size=2, block_size=16, progress=False, sample_tokens=0,
            device="cpu",
        )
