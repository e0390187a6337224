"""The sparse mixture-of-experts layer: routing, dispatch, the balance and z losses, training."""

from __future__ import annotations

import math

import pytest
import torch

import lmzoo
from lmzoo.data import prepare
from lmzoo.layers.moe import MoE, load_balancing_loss, router_z_loss
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.metrics import read_metrics


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Three tokens, four experts, top-2. Router probabilities chosen by hand; each row's logits are
# log(p) + a shift (softmax ignores it, logsumexp does not).
PROBS = torch.tensor([[0.4, 0.3, 0.2, 0.1],  # picks experts 0, 1
                      [0.1, 0.2, 0.3, 0.4],  # picks 3, 2
                      [0.1, 0.4, 0.3, 0.2]])  # picks 1, 2
SHIFTS = torch.tensor([[1.0], [2.0], [3.0]])
LOGITS = PROBS.log() + SHIFTS


def test_balance_loss_equals_the_hand_computed_value():
    experts = LOGITS.topk(2, dim=-1).indices
    # f = tokens per expert / tokens = [1, 2, 2, 1] / 3; P = column means = [0.2, 0.3, 0.8/3, 0.7/3]
    f = [1 / 3, 2 / 3, 2 / 3, 1 / 3]
    P = [0.2, 0.3, 0.8 / 3, 0.7 / 3]
    want = 4 * sum(a * b for a, b in zip(f, P))  # = 2.08888...
    assert math.isclose(want, 2.0888888, rel_tol=1e-6)
    assert math.isclose(load_balancing_loss(LOGITS, experts, 4).item(), want, rel_tol=1e-6)
    # uniform routing gives exactly k
    uniform = torch.zeros(8, 4)
    assert math.isclose(load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3]] * 4), 4).item(), 2.0)


def test_balance_loss_equals_transformers_for_one_layer():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    ours = load_balancing_loss(logits, logits.topk(2, -1).indices, 8)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert math.isclose(ours.item(), theirs.item(), rel_tol=1e-5)


def test_z_loss_equals_the_hand_computed_value():
    # logsumexp(log p + s) = s, since each row of p sums to 1
    assert math.isclose(router_z_loss(LOGITS).item(), (1 + 4 + 9) / 3, rel_tol=1e-5)


def test_the_layer_reports_the_losses_of_its_router():
    layer = MoE(dim=4, hidden=8, n_experts=4, top_k=2)
    x = torch.randn(3, 4)
    with torch.no_grad():
        layer.router.weight.copy_(torch.linalg.lstsq(x, LOGITS).solution.T)  # router(x) == LOGITS
    _, stats = layer(x)
    assert stats.tokens_per_expert.tolist() == [1, 2, 2, 1]
    assert math.isclose(stats.balance_loss.item(), 2.0888888, rel_tol=1e-4)
    assert math.isclose(stats.z_loss.item(), 14 / 3, rel_tol=1e-4)
    entropy = -(PROBS * PROBS.log()).sum(-1).mean().item()
    assert math.isclose(stats.router_entropy.item(), entropy, rel_tol=1e-4)


def test_sorted_dispatch_equals_a_loop_over_tokens_and_drops_none():
    torch.manual_seed(0)
    layer = MoE(dim=16, hidden=24, n_experts=6, top_k=2)
    x = torch.randn(2, 9, 16)
    y, stats = layer(x)
    flat = x.reshape(-1, 16)
    logits = layer.router(flat)
    top, idx = logits.topk(2, dim=-1)
    gates = top.softmax(-1)
    ref = torch.stack([sum(gates[n, j] * layer.experts[int(idx[n, j])](flat[n]) for j in range(2))
                       for n in range(flat.shape[0])])
    torch.testing.assert_close(y.reshape(-1, 16), ref, atol=1e-6, rtol=1e-5)
    assert stats.tokens_per_expert.sum().item() == 18 * 2  # capacity-free: every assignment computed


def test_gradients_reach_the_router_through_the_gates_and_the_balance_loss():
    torch.manual_seed(0)
    layer = MoE(dim=8, hidden=16, n_experts=4, top_k=2)
    y, stats = layer(torch.randn(20, 8))
    (y.square().mean() + stats.balance_loss + stats.z_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for e in layer.experts for p in e.parameters())


@pytest.mark.parametrize("preset", ["mixtral-debug", "gpt2-moe-debug"])
def test_model_loss_adds_the_weighted_router_losses_and_reports_each_term(preset):
    m = lmzoo.build(preset, moe_z_weight=1e-3)
    x = torch.randint(0, 97, (2, 16))
    out = m(x, x)
    aux = out.aux
    assert set(aux) == {"lm_loss", "moe_balance", "moe_z", "moe_entropy", "moe_tokens_per_expert"}
    want = aux["lm_loss"] + m.config.moe_aux_weight * aux["moe_balance"] + 1e-3 * aux["moe_z"]
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-6)
    assert aux["moe_tokens_per_expert"].shape == (m.config.n_layer, m.config.n_experts)
    assert (aux["moe_tokens_per_expert"].sum(1) == 2 * 16 * m.config.n_experts_per_tok).all()
    # FLOPs count the experts a token runs, not all of them
    assert m.active_params() < m.num_params(non_embedding=True)


TEXT = "".join(f"{w} the quick brown fox {i} jumps over the lazy dog.\n"
               for i, w in enumerate(["ab", "cd"] * 300))


def test_small_moe_model_trains_on_cpu_and_the_trainer_logs_expert_loads(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    data = prepare(str(tmp_path / "corpus.txt"), tmp_path / "prepared", tokenizer="char")
    cfg = TrainConfig.from_dict(dict(
        model="gpt2-moe-debug", model_args={"block_size": 32}, data_dir=str(data),
        out_dir=str(tmp_path / "run"),
        batch_size=8, block_size=32, max_steps=40, eval_interval=40, eval_iters=1, warmup_steps=2, lr=1e-2,
        min_lr=1e-3, device="cpu", dtype="float32", progress=False, sample_tokens=0,
    ))
    Trainer(cfg).train()
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(train) == 40
    assert train[-1]["lm_loss"] < 0.6 * train[0]["lm_loss"]  # it learns
    loads = train[-1]["moe_tokens_per_expert"]  # (n_layer, n_experts) from the last step
    assert len(loads) == 2 and all(sum(layer) == 8 * 32 * 2 for layer in loads)
    assert all(0 < r["moe_entropy"] <= math.log(4) + 1e-6 for r in train)
    assert all(math.isfinite(r["moe_balance"]) for r in train)
