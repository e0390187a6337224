"""Accounting of what a run costs and scores: MFU per device under several processes, token and FLOP
budgets under the batch-size ramp, bits per byte with end-of-text tokens, Transformer-XL's FLOPs with
and without its memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmzoo.data import prepare
from lmzoo.evaluation.compare import _train_dicts, compare, load_experiment
from lmzoo.evaluation.evaluate import evaluate_ids, evaluate_split, sequence_nll
from lmzoo.models import PRESETS, build_model, preset_config
from lmzoo.tokenizer import EOT, CharTokenizer
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.config import grad_accum_at
from lmzoo.train.metrics import read_metrics
from lmzoo.train.mfu import mfu

TEXT = "the quick brown fox jumps over the lazy dog while seven wizards hex jolly bears. " * 60


def _model(preset: str, **args):
    return build_model(PRESETS[preset][0], preset_config(preset, **args))


# -- 1. MFU is per device ----------------------------------------------------------------------------

def test_mfu_divides_the_jobs_tokens_by_every_devices_peak():
    fpt, per_rank, peak = 6.0e6, 1500.0, 1.0e11
    one = mfu(fpt, per_rank, peak, world_size=1)
    assert one == pytest.approx(fpt * per_rank / peak)
    # two ranks, each as fast as the single process: the job's tokens/s doubles, the MFU must not
    two = mfu(fpt, 2 * per_rank, peak, world_size=2)
    assert two == pytest.approx(one)
    assert mfu(fpt, 2 * per_rank, peak, world_size=1) == pytest.approx(2 * one)  # what the bug logged
    # half the per-rank throughput on 4 ranks is half the utilization
    assert mfu(fpt, 4 * per_rank / 2, peak, world_size=4) == pytest.approx(one / 2)
    assert mfu(fpt, per_rank, None, world_size=2) is None


def test_two_process_run_logs_mfu_per_device(prepare_text, tmp_path):
    data = prepare_text(TEXT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmzoo", "train", "--nproc", "2", "--parallel.mode=ddp", "--model=gpt2-debug",
           f"--data_dir={data}", f"--out_dir={out}", "--batch_size=2", "--block_size=16", "--max_steps=3",
           "--eval_interval=0", "--eval_iters=1", "--warmup_steps=1", "--threads=1", "--device=cpu",
           "--peak_flops=1e9", "--sample_tokens=0", "--progress=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(out)
    start = recs[0]
    train = [x for x in recs if x["kind"] == "train"]
    assert start["event"] == "start" and len(train) == 3
    for x in train:
        assert x["tokens"] == x["step"] * 2 * 16 * 2  # tokens_per_s counts both ranks' tokens
        assert x["mfu"] == pytest.approx(start["flops_per_token"] * x["tokens_per_s"] / (1e9 * 2), rel=1e-9)
    assert start["world_size"] == 2  # logged next to peak_flops: the denominator is peak x world_size


# -- 2. token and FLOP budgets under the batch-size ramp -------------------------------------------------

RAMP = {"batch_size": 2, "block_size": 16, "grad_accum": 4, "batch_ramp_steps": 6, "batch_ramp_start": 1}


def _tokens(n: int, cfg: dict) -> int:
    """Tokens of steps 0..n-1 as the trainer runs them: batch x context x grad_accum_at(step)."""
    tc = TrainConfig.from_dict(cfg)
    return sum(tc.batch_size * cfg["block_size"] * grad_accum_at(s, tc) for s in range(n))


def _experiment(tmp_path, data, budget, runs):
    common = {"data_dir": str(data), "eval_interval": 0, "eval_iters": 1, "warmup_steps": 1, "threads": 1,
              "device": "cpu"}
    return load_experiment(name="acct", out_dir=str(tmp_path / "cmp"), budget=budget, common=common, runs=runs)


@pytest.mark.parametrize("budget", [1000, 2560, 97])
def test_token_budget_sums_the_ramps_smaller_steps(prepare_text, tmp_path, budget):
    data = prepare_text(TEXT)
    exp = _experiment(tmp_path, data, {"tokens": budget},
                      [{"name": "ramp", "model": "gpt2-debug", **RAMP},
                       {"name": "flat", "model": "gpt2-debug", **RAMP, "batch_ramp_steps": 0}])
    (_, _, ramp), (_, _, flat) = _train_dicts(exp, str(data))
    for cfg in (ramp, flat):
        n = cfg["max_steps"]
        assert _tokens(n, cfg) >= budget  # reaches the budget ...
        assert n == 1 or _tokens(n - 1, cfg) < budget  # ... and one step fewer does not
    if budget > 2 * 16 * 4:
        assert ramp["max_steps"] > flat["max_steps"]  # the ramp's early steps are smaller


def test_flops_budget_sums_the_ramps_smaller_steps(prepare_text, tmp_path):
    data = prepare_text(TEXT)
    flops = 3e8
    exp = _experiment(tmp_path, data, {"flops": flops}, [{"name": "ramp", "model": "gpt2-debug", **RAMP}])
    [(_, _, cfg)] = _train_dicts(exp, str(data))
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    fpt = _model("gpt2-debug", vocab_size=vocab, block_size=16).flops_per_token(16)
    n = cfg["max_steps"]
    assert fpt * _tokens(n, cfg) >= flops > fpt * _tokens(n - 1, cfg)


def test_compare_with_a_ramp_trains_the_token_budget(prepare_text, tmp_path):
    """End to end: the trainer's own token count reaches the budget, and would not without the last step."""
    data = prepare_text(TEXT)
    budget = 1000
    exp = _experiment(tmp_path, data, {"tokens": budget}, [{"name": "ramp", "model": "gpt2-debug", **RAMP}])
    table = compare(exp, isolate=False, log=lambda *a: None)
    trained = table["rows"][0]["tokens"]
    last = [r for r in read_metrics(tmp_path / "cmp" / "runs" / "ramp-s1337") if r["kind"] == "train"][-1]
    assert last["tokens"] == trained >= budget
    assert trained - last["micro_batches"] * 2 * 16 < budget


# -- 3. bits per byte: special tokens are no bytes --------------------------------------------------------

def test_bits_per_byte_of_documents_counts_only_their_text_bytes(tmp_path):
    docs = ["the cat sat on the mat.", "héllo wörld, çà et là", "a dog", "naïve café au lait."]
    tok = CharTokenizer.from_texts(docs, special_tokens=(EOT,))
    eos = tok.eos_id
    ids = [eos]  # a boundary first: every document's tokens are then predicted
    for d in docs:
        ids += tok.encode(d) + [eos]
    model = _model("gpt2-debug", vocab_size=tok.vocab_size).eval()
    r = evaluate_ids(model, ids, tok, block_size=16)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    nll, n = sequence_nll(model, ids, 16)
    assert r.tokens == n == len(ids) - 1
    assert r.bytes == text_bytes  # the four end-of-text tokens add nothing (not 4 x len("<|endoftext|>"))
    assert r.bits_per_byte == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-9)


def test_bits_per_byte_of_a_prepared_document_split(tmp_path):
    words = "the quick brown fox jumps over a lazy dog".split()
    gen = torch.Generator().manual_seed(0)
    lines = [json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=gen))})
             for _ in range(60)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    data = prepare(str(tmp_path / "docs.jsonl"), tmp_path / "prep", tokenizer="byte", progress=False)
    meta = json.loads((data / "meta.json").read_text())
    ids = np.fromfile(data / "val.bin", dtype=np.dtype(meta["dtype"]))[: meta["val_tokens"]].astype(np.int64)
    predicted = ids[1:]
    eos_count = int((predicted == meta["eos_id"]).sum())
    assert eos_count > 0
    real_bytes = int((predicted < 256).sum())  # byte tokenizer: ids 0..255 are the text's bytes
    model = _model("gpt2-debug", vocab_size=meta["vocab_size"])
    r = evaluate_split(model, data, "val", block_size=16)
    assert r.bytes == real_bytes == r.tokens - eos_count
    assert r.bits_per_byte == pytest.approx(r.nll_nats / math.log(2) / real_bytes, rel=1e-9)


# -- 4. Transformer-XL's FLOPs count the memory only when it is attended ------------------------------

def _keys_attended(model, T: int, segments: int, with_memory: bool) -> int:
    """Keys per query in the last of ``segments`` forwards (the relative encoding's length)."""
    seen: list[int] = []
    orig = model.relative_encoding
    model.relative_encoding = lambda S, dev: (seen.append(S), orig(S, dev))[1]
    cache = model.init_cache(1) if with_memory else None
    with torch.no_grad():
        for _ in range(segments):
            model(torch.zeros(1, T, dtype=torch.long), cache=cache)
    model.relative_encoding = orig
    return seen[-1]


@pytest.mark.parametrize("mem_len", [0, 8, 24])
def test_transformer_xl_flops_count_memory_only_when_used(mem_len):
    T = 16
    model = _model("transformer-xl-debug", vocab_size=32, block_size=T, mem_len=mem_len)
    cfg = model.config
    weights = 6 * model.num_params(non_embedding=True)
    per_key = 18 * cfg.n_layer * cfg.n_head * cfg.head_dim
    plain = _keys_attended(model, T, 1, with_memory=False)
    recurrent = _keys_attended(model, T, 3, with_memory=True)  # the memory is full after the first segments
    assert plain == T and recurrent == T + mem_len
    assert model.flops_per_token(T) == weights + per_key * plain
    assert model.flops_per_token(T, recurrent=True) == weights + per_key * recurrent


def test_trainer_and_compare_count_xl_memory_only_with_recurrence(prepare_text, tmp_path):
    data = prepare_text(TEXT)
    flops = 2e8
    runs = [{"name": "xl", "model": "transformer-xl-debug", "batch_size": 2, "block_size": 16,
             "model_args": {"mem_len": 16}},
            {"name": "xlr", "model": "transformer-xl-debug", "batch_size": 2, "block_size": 16,
             "model_args": {"mem_len": 16}, "recurrence": True}]
    exp = _experiment(tmp_path, data, {"flops": flops}, runs)
    chosen = {}
    for name, _, cfg in _train_dicts(exp, str(data)):
        trainer = Trainer(TrainConfig.from_dict(cfg))
        fpt, n = trainer.flops_per_token, cfg["max_steps"]
        assert fpt * _tokens(n, cfg) >= flops > fpt * _tokens(n - 1, cfg)  # compare's FLOPs are the trainer's
        expected = trainer.model.flops_per_token(16, recurrent=cfg.get("recurrence", False))
        assert fpt == expected
        chosen[name] = (fpt, n)
    assert chosen["xlr"][0] > chosen["xl"][0]  # 32 keys per query with the memory, 16 without
    assert chosen["xlr"][1] < chosen["xl"][1]
