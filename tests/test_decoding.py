"""Jacobi decoding, CLLM consistency loss, and speculative decoding with a draft model (lmzoo/decoding/)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

import lmzoo
from lmzoo.decoding import jacobi, speculative
from lmzoo.decoding.generate import warp_logits
from lmzoo.decoding.jacobi import consistency_loss, jacobi_generate
from lmzoo.decoding.speculative import speculative_accept, speculative_generate
from lmzoo.errors import ConfigError

MODELS = [("gpt2-debug", {}), ("gpt2-debug", {"pos_emb": "rope"}), ("llama-debug", {}), ("mistral-debug", {})]


def build(preset: str, seed: int, **overrides):
    """A model with decisive logits (init_std 0.3): float rounding cannot flip a near-tie of greedy."""
    torch.manual_seed(seed)
    return lmzoo.build(preset, **{"init_std": 0.3, **overrides}).eval()


def prompts(seed: int, lengths=(5, 1, 9), vocab: int = 97) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# --- Jacobi ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,overrides", MODELS)
@pytest.mark.parametrize("block", [1, 4, 7])
def test_jacobi_decoding_equals_greedy(preset, overrides, block):
    m = build(preset, block, **overrides)
    ps = prompts(block)
    ref = lmzoo.generate(m, ps, 20, temperature=0)
    out, stats = jacobi_generate(m, ps, 20, block=block)
    assert out == ref
    assert [jacobi_generate(m, [p], 20, block=block, init="pad")[0][0] for p in ps] == ref
    # each block converges within as many iterations as it has tokens
    sizes = [min(block, 20 - i) for i in range(0, 20, block)]
    assert len(stats.iterations) == len(sizes) and all(1 <= it <= n for it, n in zip(stats.iterations, sizes))
    assert stats.steps == sum(stats.iterations) and stats.tokens == 20
    assert sum(stats.accepted) <= stats.proposed <= (block - 1) * stats.steps


def test_jacobi_converges_in_one_iteration_when_the_guess_is_right():
    m = build("gpt2-debug", 0)
    ids = [[3, 1, 4]]
    greedy = lmzoo.generate(m, ids, 8, temperature=0)[0]
    trajs: list[jacobi.Trajectory] = []
    out, stats = jacobi_generate(m, ids, 8, block=8, trajectories=trajs)
    assert out == [greedy] and len(trajs) == 1
    t = trajs[0]
    assert t.fixed.tolist() == [greedy] and torch.equal(t.prefix, torch.tensor(ids))
    assert len(t.states) == stats.iterations[0] and t.states[0].tolist() == [[4] * 8]  # init "last"
    # a model whose greedy continuation is constant converges at once from the "last" guess
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.weight[4] = 1.0
        m.norm.weight.fill_(0)
        m.norm.bias.fill_(1.0)
    out, stats = jacobi_generate(m, ids, 8, block=8)
    assert out == [[4] * 8] and stats.iterations == [1]


def test_consistency_loss_is_zero_at_the_fixed_point_and_trains_towards_it():
    m = build("gpt2-debug", 0, init_std=0.1).train()
    prefix = torch.tensor([[5, 6, 7]])
    trajs: list[jacobi.Trajectory] = []
    jacobi_generate(m, prefix, 6, block=6, trajectories=trajs)
    fixed = trajs[0].fixed
    assert consistency_loss(m, prefix, fixed, fixed).item() == pytest.approx(0.0, abs=1e-6)
    state = torch.randint(0, 97, (1, 6))
    loss = consistency_loss(m, prefix, state, fixed)
    assert loss.item() > 0
    loss.backward()
    assert m.head.weight.grad.abs().sum() > 0
    log = jacobi.consistency_train(m, [jacobi.Trajectory(prefix, [state], fixed)], iter(lambda: (prefix, prefix), None),
                                   steps=30, lr=3e-3, ar_weight=0.0)
    assert log[-1]["consistency"] < 0.2 * log[0]["consistency"]


# --- speculative decoding with a draft model ------------------------------------------------------
@pytest.mark.parametrize("preset,overrides", MODELS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_greedy(preset, overrides, k):
    target = build(preset, k, **overrides)
    draft = build(preset, 100 + k, n_layer=1, **overrides)
    ps = prompts(k)
    ref = lmzoo.generate(target, ps, 20, temperature=0)
    out, stats = speculative_generate(target, draft, ps, 20, k=k, temperature=0)
    assert out == ref
    assert stats.tokens == 20 and all(0 <= a <= k for a in stats.accepted)
    assert sum(stats.accepted) <= stats.proposed <= k * stats.steps  # each step drafts at most k
    assert [speculative_generate(target, draft, [p], 20, k=k, temperature=0)[0][0] for p in ps] == ref
    # the target as its own draft: every draft is accepted, k + 1 tokens per target pass
    out, stats = speculative_generate(target, target, ps[:1], 20, k=k, temperature=0)
    assert out == ref[:1] and stats.steps == -(-20 // (k + 1))


def test_a_draft_with_another_vocabulary_is_refused():
    target, draft = lmzoo.build("gpt2-debug"), lmzoo.build("gpt2-debug", vocab_size=96)
    with pytest.raises(ConfigError, match=r"draft model's vocabulary \(96 tokens\) differs from the target's \(97"):
        speculative_generate(target, draft, [[1, 2]], 5)
    with pytest.raises(ConfigError, match="k"):
        speculative_generate(target, target, [[1, 2]], 5, k=0)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit, cells with fewer than ``min_expected`` expected counts pooled."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    expected = probs / probs.sum() * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        assert obs[-1] == 0, "samples fell where the target has no mass"
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def _rule_pvalues(accept=speculative_accept) -> list[float]:
    """The rule on fixed (prefix-independent) p and q: each emitted position must follow p."""
    gen = torch.Generator().manual_seed(0)
    V, k, N = 6, 3, 100_000
    p = torch.softmax(torch.randn(k + 1, V, generator=gen) * 2, -1)
    q = torch.softmax(torch.randn(k, V, generator=gen) * 2, -1)
    drafts = torch.multinomial(q, N, replacement=True, generator=gen).T  # (N, k)
    n, nxt = accept(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, gen)
    out = []
    for i in range(k + 1):  # among rows that reached position i, the token there ~ p_i
        reached = n >= i
        tok = torch.where(n[reached] > i, drafts[reached, min(i, k - 1)], nxt[reached])
        out.append(_chi2_pvalue(torch.bincount(tok, minlength=V), p[i]))
    assert (n == k).sum() > 1000 and (n == 0).sum() > 1000  # both the bonus and early rejections happen
    return out


def _wrong_accept(p, q, drafts, generator=None):
    """A plausible bug: after a rejection, resample from p instead of the residual max(0, p - q)."""
    n, _ = speculative_accept(p, q, drafts, generator)
    rows = torch.arange(len(n))
    return n, torch.multinomial(p[rows, n], 1, generator=generator).squeeze(-1)


def test_acceptance_rule_keeps_the_target_distribution_and_a_wrong_rule_fails():
    assert min(_rule_pvalues()) > 1e-3
    assert min(_rule_pvalues(_wrong_accept)) < 1e-10


def _sequence_pvalue(monkeypatch, runs: int, batch: int, temperature: float, top_k, accept=None) -> float:
    """Sample 3 tokens after a fixed prompt with speculative decoding; chi-square against the target's
    exact joint distribution of the 3 tokens (enumerated)."""
    V, L = 5, 3
    target = build("gpt2-debug", 0, vocab_size=V, init_std=1.0)
    draft = build("gpt2-debug", 1, vocab_size=V, init_std=1.0, n_layer=1)
    prompt = [1, 2]
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (V^L, L)
    with torch.no_grad():
        ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
        logp = warp_logits(target(ids).logits, temperature, top_k).log_softmax(-1)[:, len(prompt) - 1 : -1]
        exact = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp()  # (V^L,)
        q = warp_logits(draft(torch.tensor([prompt])).logits[0, -1], temperature, top_k).softmax(-1)
        p = logp[0, 0].exp()
    assert 0.5 * (p - q).abs().sum() > 0.2  # the draft really differs: a rule that keeps q would show
    if accept is not None:
        monkeypatch.setattr(speculative, "speculative_accept", accept)
    counts = torch.zeros(V**L)
    for r in range(runs):
        out, _ = speculative_generate(target, draft, [prompt] * batch, L, k=2, temperature=temperature,
                                      top_k=top_k, seed=r)
        codes = (torch.tensor(out) * torch.tensor([V * V, V, 1])).sum(-1)
        counts += torch.bincount(codes, minlength=V**L)
    return _chi2_pvalue(counts, exact)


def test_speculative_sampling_follows_the_target_distribution_one_row_at_a_time(monkeypatch):
    # one row per call: steps accept 0, 1 or 2 drafts (+ the bonus token), as a user would see
    assert _sequence_pvalue(monkeypatch, runs=1500, batch=1, temperature=1.0, top_k=None) > 1e-3


def test_speculative_sampling_of_a_batch_with_warping_follows_the_target_and_a_wrong_rule_fails(monkeypatch):
    # rows of a batch keep the smallest number of accepted drafts; temperature and top-k warp both models
    assert _sequence_pvalue(monkeypatch, runs=2, batch=2000, temperature=0.8, top_k=4) > 1e-3
    assert _sequence_pvalue(monkeypatch, runs=2, batch=2000, temperature=0.8, top_k=4, accept=_wrong_accept) < 1e-6
