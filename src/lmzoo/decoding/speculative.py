"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

A small *draft* model q proposes k tokens one by one (k cheap forward passes); the large *target*
model p scores all of them in one forward pass over k + 1 positions. Draft token d_i is accepted
with probability

    min(1, p_i(d_i) / q_i(d_i)),

and at the first rejection the token is resampled from the residual distribution

    norm(max(0, p_i - q_i)) = (p_i - q_i)^+ / sum_x (p_i(x) - q_i(x))^+ .

If all k are accepted, a bonus token is drawn from p_{k+1}. Each emitted token is then distributed
exactly as p: P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(q(y), p(y))) (p(x) - q(x))^+ / Z
= min(q, p)(x) + (p - q)^+(x) = p(x), since the rejection mass 1 - sum min(q, p) equals Z.
A step emits between 1 and k + 1 tokens for one target pass; the speed-up depends on how often
the draft agrees with the target (alpha) and on the cost ratio of the two models.

With ``temperature=0`` both distributions are one-hot: a draft is accepted iff it equals the
target's argmax, and the output is the target's greedy output token for token.

Both models keep a KV cache; after a step each cache is rolled back (``cache.pos``) to the tokens
that were kept. Rows of a batch share the cache position, so a batch keeps the *smallest* number
of accepted tokens over its rows; the token each other row has at that position is its accepted
draft, itself distributed as p given the prefix, so the output distribution stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmzoo.decoding.common import (
    DecodeStats,
    leading_true,
    prepare_decoding,
    rollback_cache,
)
from lmzoo.decoding.generate import check_sampling, warp_logits
from lmzoo.errors import ConfigError


def vocab_size(model) -> int:
    """The number of tokens a model's logits cover (its config's ``vocab_size``)."""
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if v is None:
        raise ConfigError(f"{type(model).__name__} has no config.vocab_size")
    return int(v)


def check_draft(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Refuse a draft that does not share the target's vocabulary (ConfigError with both sizes).

    With both tokenizers given, also refuse tokenizers that map some id to different text.
    """
    vt, vd = vocab_size(target), vocab_size(draft)
    if vt != vd:
        raise ConfigError(
            f"the draft model's vocabulary ({vd} tokens) differs from the target's ({vt} tokens): "
            "speculative decoding needs a draft that shares the target's tokenizer"
        )
    if target_tokenizer is not None and draft_tokenizer is not None:
        from lmzoo.train.runtime import same_tokenizer

        if not same_tokenizer(target_tokenizer, draft_tokenizer):
            raise ConfigError("the draft's tokenizer maps some ids to other tokens than the target's")


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection-sampling rule for one step.

    p (B, k + 1, V): target probabilities at the k draft positions and the one after them;
    q (B, k, V): the draft probabilities the drafts (B, k) were sampled from.
    Returns (n (B,), next (B,)): row b keeps ``drafts[b, :n[b]]`` followed by ``next[b]``, drawn
    from norm(max(0, p_n - q_n)) after a rejection at n < k, or from p_k when every draft was accepted.
    """
    B, k = drafts.shape
    idx = drafts.unsqueeze(-1)
    p_d = p[:, :k].gather(-1, idx).squeeze(-1)  # (B, k) p_i(d_i)
    q_d = q.gather(-1, idx).squeeze(-1)  # (B, k) q_i(d_i) > 0: d_i was drawn from q_i
    u = torch.rand(B, k, generator=generator, device=p.device)
    n = leading_true(u * q_d < p_d)  # u < min(1, p/q)
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, n]  # (B, V)
    q_n = F.pad(q, (0, 0, 0, 1))[rows, n]  # q is zero after the last draft: the residual is then p_k itself
    residual = (p_n - q_n).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    dist = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_n)  # p == q: a rejection has probability 0
    return n, torch.multinomial(dist, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    k: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> tuple[list[list[int]], DecodeStats]:
    """Sample ``max_new_tokens`` from ``target`` for each prompt, drafting ``k`` tokens per step with ``draft``.

    Returns (new tokens of each row, :class:`DecodeStats` counting target forward passes after the
    prefill). ``temperature=0`` gives the target's greedy output; otherwise the output follows the
    target's distribution after temperature / top-k / top-p (both models' logits warped alike).
    """
    check_draft(target, draft)
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if k < 1:
        raise ConfigError(f"k (draft tokens per step) must be >= 1, got {k}")
    device = target.device
    ids, pad, max_len = prepare_decoding(prompts, max_new_tokens, target, draft)
    B, P = ids.shape
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    greedy = temperature <= 0

    def probs(logits: torch.Tensor) -> torch.Tensor:
        return warp_logits(logits, temperature, top_k, top_p).softmax(-1)

    modes = (target.training, draft.training)
    target.eval(), draft.eval()
    stats = DecodeStats()
    try:
        # each cache holds every committed token but the last: that one is fed with the next guesses
        tc, dc = rollback_cache(target, B, max_len, pad), rollback_cache(draft, B, max_len, pad)
        if P > 1:
            target(ids[:, :-1], cache=tc)
            draft(ids[:, :-1], cache=dc)
        seq = ids
        while seq.shape[1] - P < max_new_tokens:
            L = seq.shape[1]
            kk = min(k, max_new_tokens - (L - P) - 1)  # no guesses past the end
            drafts, qs, feed = [], [], seq[:, dc.pos :]
            for _ in range(kk):  # the draft runs k times, one token each
                logits = draft(feed, cache=dc).logits[:, -1]
                if greedy:
                    d = logits.argmax(-1)
                else:
                    qs.append(probs(logits))
                    d = torch.multinomial(qs[-1], 1, generator=gen).squeeze(-1)
                drafts.append(d)
                feed = d[:, None]
            drafts = torch.stack(drafts, 1) if kk else seq.new_empty(B, 0)
            # the target scores the last committed token and every draft in one pass: (B, kk + 1, V)
            t_logits = target(torch.cat([seq[:, tc.pos :], drafts], 1), cache=tc).logits[:, -(kk + 1) :]
            if greedy:
                best = t_logits.argmax(-1)  # (B, kk + 1)
                n, nxt = leading_true(drafts == best[:, :kk]), None
            else:
                p = probs(t_logits)
                q = torch.stack(qs, 1) if kk else p.new_zeros(B, 0, p.shape[-1])
                n, nxt = speculative_accept(p, q, drafts, gen)
            a = int(n.min())  # rows share the cache position: keep the fewest accepted
            if greedy:
                last = best[:, a]
            else:  # rows that accepted more keep their (accepted) draft at position a
                last = torch.where(n > a, drafts[:, min(a, kk - 1)], nxt) if kk else nxt
            seq = torch.cat([seq, drafts[:, :a], last[:, None]], 1)
            tc.rollback(L + a)  # keep [.., last committed, d_1..d_a]
            dc.rollback(min(dc.pos, L + a))
            stats.steps += 1
            stats.accepted.append(a)
            stats.proposed += kk
        stats.tokens = min(seq.shape[1] - P, max_new_tokens)
    finally:
        target.train(modes[0])
        draft.train(modes[1])
    return seq[:, P : P + max_new_tokens].tolist(), stats
