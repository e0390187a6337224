"""`lmzoo bench` and the GPU script: they run on a CPU, print JSON, and check what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmzoo.cli.app import main

ROOT = Path(__file__).resolve().parents[1]


def _json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_bench_train_prints_tokens_per_s_and_mfu(capsys):
    rc = main(["bench", "train", "--preset", "gpt2-debug", "--batch", "2", "--seq", "16", "--steps", "2",
               "--warmup", "1", "--peak-flops", "1e12", "--ce-chunk", "8"])
    assert rc == 0
    r = _json_line(capsys)
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
    assert r["vocab_multiple"] == 128 and r["ce_chunk"] == 8 and r["compiled"] is False  # eager on a CPU


def test_bench_generate_prints_bandwidth_utilization(capsys):
    rc = main(["bench", "generate", "--preset", "llama-debug", "--new-tokens", "5", "--dtype", "fp32",
               "--prompt-len", "3"])
    assert rc == 0
    r = _json_line(capsys)
    assert r["tokens_per_s"] > 0 and len(r["first_tokens"]) == 5
    assert r["bandwidth_util"] == pytest.approx(r["tokens_per_s"] * r["weight_bytes"] / (r["copy_gb_s"] * 1e9))


@pytest.mark.parametrize("argv, needle", [
    (["bench"], "choose train or generate"),
    (["bench", "train", "--preset", "gpt2-debug", "--dtype", "int3"], "unknown dtype"),
    (["bench", "generate", "--preset", "gpt2-debug", "--new-tokens", "500"], "positions"),
])
def test_bench_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_gpu_script_smoke_runs_on_cpu_and_checks_itself(tmp_path):
    out = tmp_path / "results.jsonl"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu/run_all.py"), "--smoke", "--device", "cpu", "--out", str(out),
         "--skip", "device"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    printed = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert printed == [json.loads(x) for x in out.read_text().splitlines()]  # the same lines, saved
    by = {}
    for r in printed:
        assert "error" not in r, r
        by.setdefault(r["section"], []).append(r)
    variants = {"lmzoo", "lmzoo_chunked_ce", "lmzoo_cudnn_attention", "nanogpt_style_ref"}
    assert {r["model"] for r in by["train"]} == variants
    assert all(r["tokens_per_s"] > 0 for r in by["train"])
    assert by["loss"][0]["ok"] and by["loss"][0]["tolerance"] == 0.1
    assert {r["model"] for r in by["decode"]} == {"gpt2", "llama_1b_shape"}
    for r in by["decode"]:  # float32 on a CPU: the fast path equals eager greedy decoding exactly
        assert r["first_tokens_equal_eager_fp32"] and r["tokens_per_s"] > 0
    assert by["end"][0]["failed_sections"] == 0


def test_prefetching_loader_gives_the_same_batches_and_resumes(tmp_path):
    import torch

    from lmzoo.data import TokenLoader, prepare

    (tmp_path / "in.txt").write_bytes(bytes(i % 256 for i in range(3000)))
    d = prepare(tmp_path / "in.txt", tmp_path / "out", tokenizer="byte", val_fraction=0.2, progress=False)
    plain = TokenLoader(d, "train", 8, 3, seed=5)
    ahead = TokenLoader(d, "train", 8, 3, seed=5, prefetch=True)
    expected = [plain.next_batch() for _ in range(6)]
    got = [ahead.next_batch() for _ in range(3)]
    state = ahead.state_dict()  # counts the batches handed out, not the one read ahead
    assert state["step"] == 3
    ahead.load_state_dict({**state, "step": 1})  # a rollback drops the batch read ahead
    got += [ahead.next_batch() for _ in range(5)]
    for (x, y), (ex, ey) in zip(got, expected[:3] + expected[1:6]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
