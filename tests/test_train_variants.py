"""Variants switched on by the train config (train/variants.py): multi-token heads and BitNet layers,
and the validation loss every run reports: the next-token cross-entropy, whatever else the
training objective adds (MoE router losses, the extra heads' losses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.load import load_any
from lmzoo.layers.bitlinear import BitLinear
from lmzoo.models.mtp import MultiTokenLM
from lmzoo.quant import quantizable_linears
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.metrics import read_metrics
from lmzoo.train.variants import check_variants

TEXT = "".join(f"{w} the quick brown fox {i} jumps over the lazy dog.\n" for i, w in enumerate("abc" * 300))


@pytest.fixture(scope="module")
def data_dir(prepare_text) -> Path:
    return prepare_text(TEXT)


def tiny(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="gpt2-debug", model_args={"block_size": 16}, data_dir=str(data_dir), out_dir=str(out),
                batch_size=2, block_size=16, max_steps=4, eval_interval=2, eval_iters=3, warmup_steps=1, lr=3e-3,
                min_lr=3e-4, device="cpu", dtype="float32", progress=False, sample_tokens=0)
    base.update(kw)
    return TrainConfig.from_dict(base)


def val_batches(trainer: Trainer, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    trainer.val_loader.load_state_dict(trainer._val_start)
    return [trainer.val_loader.next_batch() for _ in range(n)]


def test_val_loss_of_multi_token_run_is_head_one_cross_entropy(data_dir, tmp_path):
    t = Trainer(tiny(data_dir, tmp_path / "mtp", multi_token=3))
    assert isinstance(t.model, MultiTokenLM) and t.model.n_future == 3
    summary = t.train()
    model, batches = t.model.eval(), val_batches(t, 3)
    with torch.no_grad():
        head1 = [F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item() for x, y in batches]
        summed = [model(x, y).loss.item() for x, y in batches]
        loaded = lmzoo.load(tmp_path / "mtp")  # the checkpoint comes back with its heads
        x = batches[0][0]
        same_heads = torch.equal(loaded.head_logits(x)[2], model.head_logits(x)[2])
    assert summary["val_loss"] == pytest.approx(sum(head1) / 3, rel=1e-5)
    assert sum(summed) / 3 > summary["val_loss"] + 1.0  # the objective adds two more heads' losses
    train = [r for r in read_metrics(tmp_path / "mtp") if r["kind"] == "train"]
    assert {"mtp_loss_1", "mtp_loss_2", "mtp_loss_3"} <= set(train[-1])  # each head's loss is logged
    assert isinstance(loaded, MultiTokenLM) and loaded.n_future == 3 and same_heads


def test_val_loss_of_moe_run_leaves_out_the_router_losses(data_dir, tmp_path):
    t = Trainer(tiny(data_dir, tmp_path / "moe", model="gpt2-moe-debug", max_steps=2))
    summary = t.train()
    model = t.model.eval()
    with torch.no_grad():
        outs = [model(x, y) for x, y in val_batches(t, 3)]
    ce = sum(o.aux["lm_loss"].item() for o in outs) / 3
    objective = sum(o.loss.item() for o in outs) / 3
    assert summary["val_loss"] == pytest.approx(ce, rel=1e-5)
    assert objective - ce > 1e-3  # the balance loss the objective adds, which val loss must not


def test_bitnet_run_trains_ternary_layers_and_saves_them(data_dir, tmp_path):
    t = Trainer(tiny(data_dir, tmp_path / "bit", bitnet="b1.58", max_steps=3))
    bits = [m for m in t.model.modules() if isinstance(m, BitLinear)]
    assert len(bits) == 4 * t.model.config.n_layer  # qkv, proj, fc, proj in every block
    before = bits[0].weight.detach().clone()
    t.train()
    assert not torch.equal(before, bits[0].weight.detach())  # the latent weights train (straight-through)
    loaded = lmzoo.load(tmp_path / "bit")
    assert loaded.quantization["variant"] == "b1.58"
    x = val_batches(t, 1)[0][0]
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, t.model.eval()(x).logits, atol=1e-6)


def test_resume_refuses_another_variant(data_dir, tmp_path):
    Trainer(tiny(data_dir, tmp_path / "r", multi_token=2, max_steps=2)).train()
    with pytest.raises(CheckpointError, match="multi_token: checkpoint 2 vs run 3"):
        Trainer(tiny(data_dir, tmp_path / "r", multi_token=3, max_steps=4, resume=True))
    with pytest.raises(CheckpointError, match="bitnet: checkpoint 'off' vs run 'b1'"):
        Trainer(tiny(data_dir, tmp_path / "r", multi_token=2, bitnet="b1", max_steps=4, resume=True))


@pytest.mark.parametrize(
    "override,needle",
    [({"multi_token": 0}, "multi_token must be positive"), ({"multi_token": 65}, "at most 64"),
     ({"bitnet": "b2"}, "bitnet")],
)
def test_invalid_variant_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(override)


def test_variants_refuse_sharded_parallel_modes():
    check_variants(4, "b1", {"mode": "ddp"})  # one replica per process: fine
    with pytest.raises(ConfigError, match="multi_token and bitnet run only with parallel.mode none or ddp"):
        check_variants(4, "b1", {"mode": "fsdp"})


def test_cli_bitnet_reaches_a_family_without_attention(data_dir, tmp_path):
    """BitNet converts the declared mixer and feed-forward linears of every family, Mamba's too, and the
    trained checkpoint loads back with its ternary layers."""
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "lmzoo", "train", "--model=mamba-debug", f"--data_dir={data_dir}",
                        f"--out_dir={out}", "--bitnet=b1.58", "--max_steps=1", "--progress=false"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, _ = load_any(str(out))
    converted = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert converted and len(converted) == len(quantizable_linears(type(model)(model.config)))


def test_compare_flops_budget_counts_the_extra_heads(data_dir):
    from lmzoo.evaluation.compare import _train_dicts, load_experiment

    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    runs = [{"name": "ntp", "model": "gpt2-debug"}, {"name": "mtp4", "model": "gpt2-debug", "multi_token": 4}]
    exp = load_experiment(None, runs=runs, budget={"flops": 1e10}, common={"batch_size": 4, "block_size": 32})
    steps = {name: cfg["max_steps"] for name, _, cfg in _train_dicts(exp, str(data_dir))}
    with torch.device("meta"):
        base = lmzoo.build("gpt2-debug", vocab_size=vocab, block_size=32)
        ratio = MultiTokenLM(base, 4).flops_per_token(32) / base.flops_per_token(32)
    assert ratio > 1.5  # three more blocks and unembeddings per token
    assert steps["ntp"] / steps["mtp4"] == pytest.approx(ratio, rel=0.01)  # equal FLOPs, fewer steps
