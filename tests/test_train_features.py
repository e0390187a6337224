"""Trainer features beyond the core loop: precision, batch ramp, early stopping, time budget,
non-finite steps, a full disk, activation checkpointing (tests/test_train.py has the core)."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.data import prepare
from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.formats import checkpoint as ckpt_mod
from lmzoo.models import FAMILIES, PRESETS, build
from lmzoo.models.base import LMOutput
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.activation_checkpointing import (
    apply_activation_checkpointing,
    peak_memory_bytes,
    remove_activation_checkpointing,
)
from lmzoo.train.config import grad_accum_at
from lmzoo.train.metrics import read_metrics
from lmzoo.train.precision import is_norm

TEXT = "".join(
    f"{w} the quick brown fox {i} jumps over the lazy dog.\n" for i, w in enumerate(["a", "b", "c"] * 300)
)


@pytest.fixture(scope="module")
def data_dir(prepare_text) -> Path:
    return prepare_text(TEXT)


def tiny(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model="gpt2-debug",
        model_args={"block_size": 16},
        data_dir=str(data_dir),
        out_dir=str(out),
        batch_size=2,
        block_size=16,
        max_steps=4,
        eval_interval=0,
        eval_iters=1,
        warmup_steps=1,
        lr=3e-3,
        min_lr=3e-4,
        device="cpu",
        dtype="float32",
        progress=False,
        sample_tokens=0,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(out) if r["kind"] == kind]


# -- precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_mixed_precision_trains_with_autocast_and_a_scaler_for_fp16(data_dir, tmp_path, dtype):
    """Under autocast every Linear of the model computes in the compute dtype from float32 inputs (the
    weights and the residual stream stay float32); float32 runs without it. float16 adds a loss scaler."""
    t = Trainer(tiny(data_dir, tmp_path / dtype, dtype=dtype, max_steps=3))
    assert t.scaler.is_enabled() == (dtype == "float16")
    seen: list[tuple[torch.dtype, torch.dtype]] = []  # (input, output) dtype of each Linear call
    linears = [m for m in t.model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype))) for m in linears]
    s = t.train()
    for h in hooks:
        h.remove()
    assert s["step"] == 3 and s["nonfinite_steps"] == 0
    assert len(seen) >= 3 * len(linears)  # every layer, every step (evaluation and sampling add more)
    assert {o for _, o in seen} == {getattr(torch, dtype)}
    assert torch.float32 in {i for i, _ in seen}
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # fp32 master weights


def test_bf16_parameters_keep_norms_in_float32(data_dir, tmp_path):
    t = Trainer(
        tiny(data_dir, tmp_path / "r", dtype="bfloat16", param_dtype="bfloat16", max_steps=2, eval_interval=2)
    )
    norms = {id(p) for m in t.model.modules() if is_norm(m) for p in m.parameters()}
    for p in t.model.parameters():
        assert p.dtype == (torch.float32 if id(p) in norms else torch.bfloat16)
    for st in t.optimizer.state.values():  # AdamW moments follow the parameter's dtype
        assert st["exp_avg"].dtype in (torch.float32, torch.bfloat16)
    s = t.train()
    assert math.isfinite(s["val_loss"])
    assert lmzoo.load(tmp_path / "r").dtype == torch.float32  # loads into a float32 model


def test_compile_runs_a_training_step(data_dir, tmp_path):
    # aot_eager traces through dynamo and AOTAutograd like inductor, without C++ code generation (seconds,
    # not minutes, on a busy 2-core machine); inductor is exercised by the GPU check and the benchmarks
    s = Trainer(
        tiny(data_dir, tmp_path / "c", compile=True, compile_backend="aot_eager", max_steps=2)
    ).train()
    assert s["step"] == 2 and s["nonfinite_steps"] == 0


# -- batch: global batch, ramp -------------------------------------------------------------------------


def test_global_batch_sets_accumulation_and_must_divide():
    cfg = TrainConfig.from_dict({"global_batch": 48, "batch_size": 12})
    assert cfg.accum_steps == 4 and cfg.replace(batch_size=6).accum_steps == 8
    with pytest.raises(ConfigError, match="global_batch 50 is not divisible by batch_size 12"):
        TrainConfig.from_dict({"global_batch": 50, "batch_size": 12})
    with pytest.raises(ConfigError, match="contradicts global_batch"):
        TrainConfig.from_dict({"global_batch": 48, "batch_size": 12, "grad_accum": 3})


def test_batch_ramp_grows_micro_batches_and_resumes_bit_identically(data_dir, tmp_path):
    kw = dict(grad_accum=4, batch_ramp_steps=4, batch_ramp_start=1, max_steps=8, decay_steps=8)
    cfg = tiny(data_dir, tmp_path / "full", **kw)
    assert [grad_accum_at(s, cfg) for s in range(6)] == [1, 1, 2, 3, 4, 4]
    full = Trainer(cfg)
    full.train()
    Trainer(tiny(data_dir, tmp_path / "split", **{**kw, "max_steps": 3})).train()
    Trainer(tiny(data_dir, tmp_path / "split", **kw, resume=True)).train()
    a, b = records(tmp_path / "full", "train"), records(tmp_path / "split", "train")
    assert [r["micro_batches"] for r in a] == [1, 1, 2, 3, 4, 4, 4, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["tokens"] == b[-1]["tokens"] == 2 * 16 * sum(r["micro_batches"] for r in a)


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"batch_ramp_steps": 10, "batch_ramp_start": 5, "grad_accum": 2}, "batch_ramp_start"),
        ({"decay_steps": 50, "warmup_steps": 100}, "decay_steps"),
        ({"schedule_unit": "time"}, "max_time_s"),
        ({"wsd_decay_frac": 1.5}, "wsd_decay_frac"),
        ({"min_lr": 1.0, "lr": 0.1}, "min_lr"),
        ({"max_time_s": -1}, "max_time_s"),
        ({"early_stop_patience": -2}, "early_stop_patience"),
        ({"global_batch": 0}, "global_batch"),
    ],
)
def test_invalid_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(override)


# -- stopping --------------------------------------------------------------------------------------------


def test_early_stopping_after_patience_evaluations_without_improvement(data_dir, tmp_path):
    # min_delta larger than any possible gain: only the first evaluation counts as an improvement
    s = Trainer(
        tiny(
            data_dir,
            tmp_path / "r",
            max_steps=100,
            eval_interval=2,
            early_stop_patience=2,
            early_stop_min_delta=100.0,
        )
    ).train()
    assert s["stop_reason"] == "early_stop" and s["step"] == 6
    assert [r["step"] for r in records(tmp_path / "r", "eval")] == [2, 4, 6]
    assert (tmp_path / "r" / "LATEST").read_text().strip() == "ckpt-00000006"


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_with_a_final_evaluation_and_decays_lr_over_time(data_dir, tmp_path, clock):
    kw = dict(max_steps=10**6, max_time_s=1.0, schedule_unit="time", time_clock=clock)
    cfg = tiny(data_dir, tmp_path / "r", **kw)
    s = Trainer(cfg).train()
    assert s["stop_reason"] == "time" and 0 < s["step"] < 10**6
    assert records(tmp_path / "r", "eval")[-1]["step"] == s["step"]
    lrs = [r["lr"] for r in records(tmp_path / "r", "train")]
    assert lrs[-1] < 0.5 * lrs[1]  # decayed with the wall clock, not with max_steps
    assert s["train_time_s"] < 1.0 + 5.0  # stopped near the budget (one step and the eval past it at most)


def test_injected_nan_loss_is_skipped_counted_logged_then_aborts(data_dir, tmp_path):
    t = Trainer(tiny(data_dir, tmp_path / "once", max_steps=4))
    calls = {"n": 0}
    real = t.step_fn

    def nan_once(x, y, **kw):
        calls["n"] += 1
        out = real(x, y, **kw)
        return LMOutput(out.logits, out.loss * float("nan")) if calls["n"] == 2 else out

    t.step_fn = nan_once
    s = t.train()
    assert s["step"] == 4 and s["nonfinite_steps"] == 1
    ev = [r for r in records(tmp_path / "once", "event") if r.get("event") == "nonfinite_skip"]
    assert len(ev) == 1 and ev[0]["loss"] == "nan" and ev[0]["step"] == 1

    t = Trainer(tiny(data_dir, tmp_path / "always", max_steps=10, max_nonfinite=3))
    t.step_fn = lambda x, y, **kw: LMOutput(real(x, y).logits, torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(LmzooError, match="3 non-finite steps in a row at step 0"):
        t.train()
    ev = [r for r in records(tmp_path / "always", "event") if r.get("event") == "nonfinite_skip"]
    assert [r["in_row"] for r in ev] == [1, 2, 3]


# -- checkpoints: full disk, another vocabulary ---------------------------------------------------


def test_full_disk_during_checkpoint_write_is_one_clear_line_and_keeps_the_previous(
    data_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def writer(*args, **kwargs):  # the second checkpoint write finds the disk full
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", writer)
    with pytest.raises(OSError, match="No space left on device.*ckpt-00000002 is intact"):
        Trainer(tiny(data_dir, out, ckpt_interval=2)).train()
    assert (out / "LATEST").read_text().strip() == "ckpt-00000002"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "ckpt"))) == ["ckpt-00000002"]
    assert lmzoo.load(out) is not None and ckpt_mod.load_train_state(out / "ckpt-00000002")["step"] == 2

    from lmzoo.cli.app import main  # the same through the CLI: exit 1, one line on stderr

    calls["n"] = 1
    capsys.readouterr()
    rc = main(
        [
            "train",
            f"--data_dir={data_dir}",
            f"--out_dir={tmp_path / 'cli'}",
            "--model=gpt2-debug",
            "--model.block_size=16",
            "--block_size=16",
            "--batch_size=2",
            "--max_steps=2",
            "--eval_interval=0",
            "--progress=false",
            "--sample_tokens=0",
            "--device=cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("lmzoo: error: could not write the best checkpoint") and "No space left" in err


def test_resume_refuses_another_vocabulary_or_tokenizer(data_dir, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(data_dir, out, max_steps=2)).train()
    (tmp_path / "other.txt").write_text("xyz " * 200 + "0123456789" * 50)  # another alphabet
    other = prepare(str(tmp_path / "other.txt"), tmp_path / "other", tokenizer="char", progress=False)
    with pytest.raises(CheckpointError, match="another architecture or vocabulary.*vocab_size"):
        Trainer(tiny(other, out, resume=True))
    # the same number of characters, different ones: the vocabulary size matches, the tokens do not
    chars = sorted(set(TEXT))
    shifted = "".join(chr(ord("A") + i) if c != "\n" else c for i, c in enumerate(chars))
    (tmp_path / "same.txt").write_text(shifted * 40)
    same = prepare(str(tmp_path / "same.txt"), tmp_path / "same", tokenizer="char", progress=False)
    assert lmzoo.data.load_meta(same)["vocab_size"] == lmzoo.data.load_meta(data_dir)["vocab_size"]
    with pytest.raises(CheckpointError, match="another tokenizer"):
        Trainer(tiny(same, out, resume=True))


# -- activation checkpointing ----------------------------------------------------------------------------


def _grads(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x, y).loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grad_checkpointing_gives_the_same_gradients_for_every_family(family):
    preset = next(p for p, (f, _) in PRESETS.items() if f == family and p.endswith("-debug"))
    torch.manual_seed(0)
    model = build(preset).train()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    y = torch.randint(0, model.config.vocab_size, (2, 16))
    ref = _grads(model, x, y)
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model) == model.config.n_layer
    assert list(model.state_dict()) == keys  # names unchanged: checkpoints stay loadable
    got = _grads(model, x, y)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5, rtol=1e-5), k
    idx = torch.tensor([[1, 2, 3]])
    wrapped = model(idx, cache=model.init_cache(1, 8)).logits  # a cache passed: the block runs plainly
    remove_activation_checkpointing(model)
    assert torch.equal(wrapped, model(idx, cache=model.init_cache(1, 8)).logits)


def test_grad_checkpointing_lowers_peak_activation_memory():
    torch.manual_seed(0)
    model = build("gpt2-debug", n_layer=6, n_embd=64, block_size=64).train()
    x = torch.randint(0, 97, (8, 64))
    y = torch.randint(0, 97, (8, 64))

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x, y).loss.backward()

    plain = peak_memory_bytes(fwd_bwd)
    apply_activation_checkpointing(model)
    ckpt = peak_memory_bytes(fwd_bwd)
    assert ckpt < 0.6 * plain, (ckpt, plain)


def test_grad_checkpointing_flag_trains(data_dir, tmp_path):
    s = Trainer(tiny(data_dir, tmp_path / "r", grad_checkpointing=True, max_steps=2)).train()
    assert s["step"] == 2 and s["nonfinite_steps"] == 0
