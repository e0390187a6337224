"""Distributed modes on CPU with gloo: two processes spawned by the test must reproduce the loss
trajectory of one process at the same global batch (float32, <= 1e-4 relative)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp

from lmzoo.distributed import (
    ParallelConfig,
    check_layout,
    clip_grad_norm,
    gradient_sync,
    parallelize,
    reduce_mean,
    setup,
    teardown,
)
from lmzoo.distributed.checkpoint import load_sharded, save_sharded
from lmzoo.errors import ConfigError
from lmzoo.models import PRESETS, build_model, preset_config

STEPS, ACCUM, GLOBAL_BATCH, T = 5, 2, 4, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(preset: str = "gpt2-debug"):
    torch.manual_seed(0)  # (the debug presets have no dropout)
    return build_model(PRESETS[preset][0], preset_config(preset))


def _batches():
    gen = torch.Generator().manual_seed(3)
    # ids drawn from 10 of the 97 tokens: a distribution five steps can learn (the loss must fall)
    return [[torch.randint(0, 10, (GLOBAL_BATCH, T + 1), generator=gen) for _ in range(ACCUM)] for _ in range(STEPS)]


def _run(model, step_model, ctx=None, rows=slice(None), optimizer="adamw", split=1):
    """STEPS optimizer steps of ACCUM micro-batches, each cut into ``split`` pieces (a pipeline's micro-
    batches: a mixture of experts' balance loss is a per-batch statistic); the loss trajectory (mean over
    ranks)."""
    from lmzoo.train.optimizers import make_optimizer

    opt = make_optimizer(optimizer, model, 1e-2, (0.9, 0.95), 0.1)
    losses = []
    for micro in _batches():
        total = torch.zeros(())
        for i, b in enumerate(micro):
            for piece in b[rows].chunk(split):
                with gradient_sync(step_model, i == ACCUM - 1):
                    loss = step_model(piece[:, :-1], piece[:, 1:]).loss / (ACCUM * split)
                    loss.backward()
                total += loss.detach()
        norm = clip_grad_norm(list(model.parameters()), 1.0)
        assert torch.isfinite(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(reduce_mean(total, ctx) if ctx is not None else float(total))
    return losses


CASES = [
    ("ddp", "gpt2-debug", "adamw"),
    ("fsdp", "gpt2-debug", "adamw"),
    ("fsdp", "llama-debug", "muon"),
    ("tp", "gpt2-debug", "adamw"),
    ("tp", "llama-debug", "muon"),
]
# pipeline parallel cuts every family into stages from its own forward: tied GPT-2, Mixtral's experts
# (router losses carried from stage to stage), Mamba, Jamba (attention, Mamba, MoE layers)
PP_CASES = [("pp", preset, "adamw") for preset in ("gpt2-debug", "mixtral-debug", "mamba-debug", "jamba-debug")]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """Every case in one pair of processes: starting processes costs more than the cases (busy CPUs)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    results = {}
    for mode, preset, optimizer in CASES:
        model = _model(preset)
        ctx = setup({"mode": mode, "timeout_s": 60}, batch_size=GLOBAL_BATCH // world, model_config=model.config)
        step_model = parallelize(model, ctx)
        per = GLOBAL_BATCH // ctx.dp_size
        rows = slice(ctx.dp_rank * per, (ctx.dp_rank + 1) * per)
        results[(mode, preset, optimizer)] = _run(model, step_model, ctx, rows, optimizer)
    for case in PP_CASES:
        results[case] = _run_pp(world, case[1])
    # an FSDP2 checkpoint written by both ranks, for the test that loads it in one process
    model = _model()
    ctx = setup({"mode": "fsdp"}, batch_size=GLOBAL_BATCH // world, model_config=model.config)
    parallelize(model, ctx)
    _run(model, model, ctx, slice(rank * 2, rank * 2 + 2))
    save_sharded(out + ".dcp", model)
    with torch.no_grad():
        logits = model(_batches()[0][0][:, :-1]).logits
    if rank == 0:
        torch.save({"losses": results, "logits": logits}, out)
    teardown()  # barrier, then destroy: exiting with live gloo threads can abort (SIGABRT) after success


def _run_pp(world: int, preset: str = "gpt2-debug", schedule: str = "1f1b") -> list[float]:
    from lmzoo.distributed.pipeline import Pipeline
    from lmzoo.train.optimizers import make_optimizer

    model = _model(preset)
    ctx = setup({"mode": "pp", "microbatches": 2, "schedule": schedule}, batch_size=GLOBAL_BATCH,
                model_config=model.config)
    pipe = Pipeline(model, ctx)
    opt = make_optimizer("adamw", pipe.module, 1e-2, (0.9, 0.95), 0.1)
    losses = []
    for micro in _batches():
        total = sum(pipe.step(b[:, :-1], b[:, 1:], accum=ACCUM) for b in micro) / ACCUM
        pipe.sync_tied_grads()
        pipe.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("dist") / "losses.pt")
    t0 = time.time()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    print(f"two-rank cases: {time.time() - t0:.1f}s, load average {os.getloadavg()}")
    return torch.load(out)


def _reference(preset: str = "gpt2-debug", optimizer: str = "adamw", split: int = 1) -> list[float]:
    model = _model(preset)
    return _run(model, model, optimizer=optimizer, split=split)


@pytest.mark.parametrize("mode,preset,optimizer", CASES + PP_CASES)
def test_two_ranks_match_one_process(two_rank_results, mode, preset, optimizer):
    # pp: the same gradient as one process accumulating the pipeline's 2 micro-batches
    ref = _reference(preset, optimizer, split=2 if mode == "pp" else 1)
    got = two_rank_results["losses"][(mode, preset, optimizer)]
    assert ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=0)


def test_fsdp_checkpoint_from_two_ranks_loads_in_one_process(two_rank_results, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "dist0" / "losses.pt.dcp"
    model = _model()
    for p in model.parameters():  # make sure the weights come from the checkpoint
        torch.nn.init.zeros_(p)
    load_sharded(path, model)
    with torch.no_grad():
        logits = model(_batches()[0][0][:, :-1]).logits
    torch.testing.assert_close(logits, two_rank_results["logits"], rtol=1e-5, atol=1e-5)


def test_bad_layouts_fail_before_any_process_group():
    cfg = preset_config("gpt2-debug")  # n_head 4, n_kv_head 2, n_layer 2
    with pytest.raises(ConfigError, match="not divisible by batch_size 2 x world size 3"):
        check_layout(ParallelConfig(mode="ddp"), 3, 2, global_batch=8)
    with pytest.raises(ConfigError, match="must divide the attention heads"):
        check_layout(ParallelConfig(mode="tp"), 4, 2, model_config=cfg)
    with pytest.raises(ConfigError, match="3 pipeline stages need at least as many layers; the model has 2"):
        check_layout(ParallelConfig(mode="pp"), 3, 2, model_config=cfg)
    with pytest.raises(ConfigError, match="unknown parallel mode 'fdsp'.*did you mean: fsdp"):
        ParallelConfig.from_dict({"mode": "fdsp"})


def _torchrun(args: list[str], tmp_path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


def test_a_rank_that_dies_fails_the_job_instead_of_hanging(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent("""
        import os, torch
        from lmzoo.distributed import reduce_mean, setup
        ctx = setup({"mode": "ddp", "timeout_s": 20}, batch_size=1)
        if ctx.rank == 1:
            os._exit(7)  # a crash: no error message, no goodbye to the process group
        reduce_mean(1.0, ctx)  # rank 0 waits on a peer that is gone
    """))
    t0 = time.time()
    r = _torchrun([str(script)], tmp_path, timeout=120)
    assert r.returncode != 0
    assert "exitcode" in r.stderr and "7" in r.stderr  # torchrun names the failed rank and its exit code
    assert time.time() - t0 < 100


@pytest.mark.slow
def test_torchrun_lmzoo_train_ddp(tmp_path):
    """``torchrun -m lmzoo train`` end to end: rank 0 alone writes metrics and checkpoints."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = ["-m", "lmzoo", "train", "--model=gpt2-debug", f"--source={text}", "--out_dir=run", "--max_steps=3",
            "--batch_size=2", "--global_batch=8", "--block_size=16", "--eval_iters=1", "--warmup_steps=1",
            "--sample_tokens=0", "--progress=false", "--parallel.mode=ddp"]
    r = _torchrun(args, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "terminate called" not in r.stderr  # every rank left the process group before exiting
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in ln or '"kind":"train"' in ln for ln in lines) == 3
    assert (tmp_path / "run" / "LATEST").is_file()
