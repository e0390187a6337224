"""Multi-token prediction (mtp.py): n=1 is the model, the sequential backward, self-speculative decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.models.mtp import MultiTokenLM, self_speculative_generate

CASES = [("gpt2-debug", {}), ("gpt2-debug", {"pos_emb": "rope", "norm": "rmsnorm"}),
         ("llama-debug", {}), ("mistral-debug", {})]


def make(preset: str, overrides: dict, n: int, seed: int = 0, std: float = 0.02) -> MultiTokenLM:
    torch.manual_seed(seed)
    m = MultiTokenLM(lmzoo.build(preset, init_std=std, **overrides), n_future=n)
    with torch.no_grad():  # heads start as copies of the last block: make them differ
        for p in m.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("preset,overrides", CASES)
def test_one_head_is_the_ordinary_model(preset, overrides):
    torch.manual_seed(0)
    base = lmzoo.build(preset, **overrides)
    mtp = MultiTokenLM(base, n_future=1)
    assert mtp.num_params() == base.num_params()
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    ref = base(x, y)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in base.named_parameters()}
    base.zero_grad()
    out = mtp(x, y)
    out.loss.backward()
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    for n, p in base.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-7, rtol=1e-6)
    with torch.no_grad():  # cached decoding too
        cache, ref_cache = mtp.init_cache(2, 16), base.init_cache(2, 16)
        for t0, t1 in [(0, 9), (9, 10), (10, 16)]:
            torch.testing.assert_close(mtp(x[:, t0:t1], cache=cache).logits,
                                       base(x[:, t0:t1], cache=ref_cache).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset,overrides", CASES[:3])
def test_memory_efficient_backward_gives_the_naive_summed_loss_gradients(preset, overrides):
    m = make(preset, overrides, n=3).train()
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    grads = []
    for efficient in (False, True):
        m.memory_efficient = efficient
        m.zero_grad()
        out = m(x, y)
        (0.5 * out.loss).backward()  # a scale (the trainer's 1/grad_accum) reaches every gradient
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        assert out.loss.item() == pytest.approx(sum(out.aux[f"mtp_loss_{i}"].item() for i in (1, 2, 3)))
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
    assert all(g.abs().sum() > 0 for g in grads[1].values())  # every head, the trunk and the embeddings


def test_head_i_is_trained_on_the_token_i_places_ahead():
    m = make("gpt2-debug", {}, n=3).eval()
    x = torch.randint(0, 97, (2, 12))
    seq = torch.randint(0, 97, (2, 13))
    x, y = seq[:, :-1], seq[:, 1:]
    out = m(x, y)
    with torch.no_grad():
        logits = m.head_logits(x)
    for i in range(3):  # head i+1 at position t predicts seq[t + i + 1]
        ref = F.cross_entropy(logits[i][:, : 12 - i].reshape(-1, 97), seq[:, i + 1 :].reshape(-1))
        torch.testing.assert_close(out.aux[f"mtp_loss_{i + 1}"], ref)


def test_cached_head_logits_match_the_full_forward():
    m = make("llama-debug", {}, n=3).eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = m.head_logits(x)
        cache = m.init_cache(2, 20)
        parts = [m.head_logits(x[:, :8], cache), m.head_logits(x[:, 8:11], cache), m.head_logits(x[:, 11:], cache)]
    for i in range(3):
        torch.testing.assert_close(torch.cat([p[i] for p in parts], 1), full[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,overrides", CASES)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_self_speculative_greedy_equals_ordinary_greedy(preset, overrides, n):
    # a larger init makes the logits decisive: no near-ties for float rounding to flip
    m = make(preset, overrides, n=n, seed=n, std=0.3).eval()
    gen = torch.Generator().manual_seed(n)
    prompts = [torch.randint(0, 97, (L,), generator=gen).tolist() for L in (1, 6, 3)]
    ref = lmzoo.generate(m.base, prompts, 18, temperature=0)
    out, stats = self_speculative_generate(m, prompts, 18)
    assert out == ref
    assert stats.tokens == 18 and stats.steps == len(stats.accepted)
    assert all(0 <= a <= n - 1 for a in stats.accepted)
    assert sum(stats.accepted) <= stats.proposed <= (n - 1) * stats.steps
    assert stats.steps == 18 if n == 1 else stats.steps <= 18
    for p, r in zip(prompts, ref):  # one row alone gives the same tokens
        assert self_speculative_generate(m, [p], 18)[0] == [r]


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="n_future"):
        MultiTokenLM(lmzoo.build("gpt2-debug"), n_future=0)
    with pytest.raises(ConfigError, match="gpt2 model: its ffn is a mixture of experts"):
        MultiTokenLM(lmzoo.build("gpt2-moe-debug"), n_future=2)
    m = make("gpt2-debug", {}, n=2)  # learned positions: block_size 32
    with pytest.raises(ConfigError, match="positions"):
        self_speculative_generate(m, [[1, 2, 3]], 40)


def test_saved_multi_token_model_loads_with_its_heads(tmp_path):
    """lmzoo.save records n_future; lmzoo.load rebuilds the heads, so every head's logits come back."""
    m = make("llama-debug", {}, n=3).eval()
    lmzoo.save(m, tmp_path / "mtp")
    back = lmzoo.load(tmp_path / "mtp")
    assert isinstance(back, MultiTokenLM) and back.n_future == 3
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b = m(idx, targets), back(idx, targets)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(list(b.aux.values())), torch.stack(list(a.aux.values())), rtol=0, atol=0)
    assert self_speculative_generate(back, [[1, 2, 3]], 8)[0] == self_speculative_generate(m, [[1, 2, 3]], 8)[0]
    cfg = tmp_path / "mtp" / "config.json"
    cfg.write_text(cfg.read_text().replace('"n_future": 3', '"n_future": -3'))
    with pytest.raises(lmzoo.errors.CheckpointError, match="n_future must be an integer"):
        lmzoo.load(tmp_path / "mtp")
