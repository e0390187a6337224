"""Muon and AdEMAMix: the Newton–Schulz band, parameter routing, accumulation, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmzoo.errors import ConfigError
from lmzoo.models import PRESETS, build_model, preset_config
from lmzoo.train.muon import Muon, muon_param_groups, newton_schulz, update_scale
from lmzoo.train.optimizers import AdEMAMix, make_optimizer


def _model(name: str = "gpt2-debug"):
    torch.manual_seed(0)
    return build_model(PRESETS[name][0], preset_config(name))


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (4, 32, 96)])
def test_newton_schulz_puts_singular_values_in_documented_band(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    s_in = torch.linalg.svdvals(g)
    assert (s_in.max(-1).values / s_in.min(-1).values).min() > 2  # genuinely ill-conditioned input
    s = torch.linalg.svdvals(newton_schulz(g, steps=5))
    assert s.min() >= 0.68 and s.max() <= 1.21, (s.min(), s.max())  # band derived in muon.py's docstring
    # the singular vectors are kept: NS5(G) is close to the exact polar factor U V^T
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    o, polar = newton_schulz(g), u @ vh
    cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.95).all()


def test_newton_schulz_bfloat16_close_to_float32():
    g = torch.randn(32, 64)
    a, b = newton_schulz(g), newton_schulz(g, dtype=torch.bfloat16)
    assert (a - b).norm() / a.norm() < 0.05


def test_update_scales():
    assert update_scale(torch.Size([64, 256]), "moonlight") == pytest.approx(0.2 * 16)
    assert update_scale(torch.Size([256, 64]), "modded") == pytest.approx(2.0)
    assert update_scale(torch.Size([64, 256]), "modded") == 1.0


def test_muon_routes_hidden_matrices_only():
    model = _model()
    groups = muon_param_groups(model, 0.1)
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names and all(".mixer." in n or ".ffn." in n for n in names)
    assert id(model.embed.weight) not in muon and id(model.head.weight) not in muon
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in model.parameters()})


def _train(opt_name: str, steps: int, accum: int, model=None, opt=None, seed: int = 0, fixed=False, **args):
    model = model or _model()
    opt = opt or make_optimizer(opt_name, model, 3e-3, (0.9, 0.95), 0.1, args=args)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        total = 0.0
        if fixed:  # the same batch every step: a loss that can fall (random tokens cannot beat ln 97)
            gen.manual_seed(seed)
        for _ in range(accum):
            x = torch.randint(0, 97, (2, 16), generator=gen)
            loss = model(x, x.roll(-1, 1)).loss / accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return model, opt, losses


@pytest.mark.parametrize(
    "name,args", [("muon", {}), ("muon", {"scaling": "modded", "lr_mult": 5}), ("ademamix", {"warmup": 4})]
)
def test_optimizer_lowers_loss(name, args):
    _, _, losses = _train(name, 12, 1, fixed=True, **args)
    assert losses[-1] < losses[0] - 0.5


def test_muon_grad_accumulation_equals_big_batch():
    """Two micro-batches of 2 rows each (loss / 2) step exactly like one batch of 4 rows."""
    m1, m2 = _model(), _model()
    o1 = make_optimizer("muon", m1, 3e-3, (0.9, 0.95), 0.1)
    o2 = make_optimizer("muon", m2, 3e-3, (0.9, 0.95), 0.1)
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    for half in (x[:2], x[2:]):
        (m1(half, half.roll(-1, 1)).loss / 2).backward()
    m2(x, x.roll(-1, 1)).loss.backward()
    o1.step()
    o2.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["muon", "ademamix"])
def test_state_dict_round_trip_continues_bit_identically(name):
    model, opt, _ = _train(name, 3, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _, _, cont = _train(name, 3, 2, model=model, opt=opt, seed=5)
    fresh = _model()
    fresh.load_state_dict(saved_model)
    opt2 = make_optimizer(name, fresh, 3e-3, (0.9, 0.95), 0.1)
    opt2.load_state_dict(saved_opt)
    _, _, resumed = _train(name, 3, 2, model=fresh, opt=opt2, seed=5)
    assert cont == resumed
    for p1, p2 in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("warmup", [0, 3])
def test_ademamix_steps_follow_the_papers_algorithm(warmup):
    """Five AdEMAMix steps against Algorithm 1 of Pagliardini et al. (2024) written out in float64: a fast
    EMA with bias correction plus alpha times a slow EMA without, over Adam's bias-corrected second moment,
    decoupled weight decay on the previous weights, and the paper's schedulers
    alpha(t) = min(t alpha / T, alpha), beta3(t) = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + t/T ln b1)), b3)."""
    lr, b1, b2, b3, alpha, eps, wd = 1e-2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.1
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(6, 4, generator=gen)
    grads = [torch.randn(6, 4, generator=gen) for _ in range(5)]
    p = torch.nn.Parameter(p0.clone())
    opt = AdEMAMix([p], lr=lr, betas=(b1, b2, b3), alpha=alpha, warmup=warmup, eps=eps, weight_decay=wd)
    theta = p0.double()
    m1, m2, nu = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        g = g.double()
        if warmup:
            a_t = min(t * alpha / warmup, alpha)
            f = t / warmup
            b3_t = min(math.exp(math.log(b1) * math.log(b3) / ((1 - f) * math.log(b3) + f * math.log(b1))), b3)
        else:
            a_t, b3_t = alpha, b3
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3_t * m2 + (1 - b3_t) * g
        nu = b2 * nu + (1 - b2) * g * g
        m1_hat, nu_hat = m1 / (1 - b1**t), nu / (1 - b2**t)
        theta = theta - lr * ((m1_hat + a_t * m2) / (nu_hat.sqrt() + eps) + wd * theta)
        torch.testing.assert_close(p.detach().double(), theta, rtol=1e-5, atol=1e-6)
    # the comparison sees the slow EMA: the same steps with alpha = 0 (Adam's update) end farther from
    # these weights than its tolerance (beta3 near 1 keeps m2 small over five steps, hence the small margin)
    q = torch.nn.Parameter(p0.clone())
    adam_like = AdEMAMix([q], lr=lr, betas=(b1, b2, b3), alpha=0.0, warmup=warmup, eps=eps, weight_decay=wd)
    for g in grads:
        q.grad = g.clone()
        adam_like.step()
    assert (q - p).abs().max() > 5e-5


def test_make_optimizer_rejects_bad_names():
    model = _model()
    with pytest.raises(ConfigError, match="did you mean: muon"):
        make_optimizer("muom", model, 1e-3, (0.9, 0.95), 0.0)
    with pytest.raises(ConfigError, match="unknown muon optimizer_args"):
        make_optimizer("muon", model, 1e-3, (0.9, 0.95), 0.0, args={"momentun": 0.9})
    assert isinstance(make_optimizer("muon", model, 1e-3, (0.9, 0.95), 0.0), Muon)
    assert isinstance(make_optimizer("ademamix", model, 1e-3, (0.9, 0.95), 0.0), AdEMAMix)


def test_trainer_trains_with_muon(tmp_path):
    from lmzoo.train import TrainConfig, Trainer

    data = tmp_path / "data"
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = TrainConfig(
        model="gpt2-debug", source=str(text), tokenizer="char", data_dir=str(data), out_dir=str(tmp_path / "run"),
        max_steps=4, eval_interval=2, eval_iters=1, batch_size=2, block_size=16, warmup_steps=1, progress=False,
        sample_tokens=0, optimizer="muon", lr=3e-3, min_lr=3e-4, threads=1, decay_steps=6,
    )
    first = Trainer(cfg).train()
    resumed = Trainer(cfg.replace(max_steps=6, resume=True)).train()
    straight = Trainer(cfg.replace(max_steps=6, out_dir=str(tmp_path / "run2"))).train()
    assert first["step"] == 4 and resumed["val_loss"] == straight["val_loss"]
