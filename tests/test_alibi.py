"""ALiBi (layers/alibi.py): the paper's slopes, the bias it adds, and evaluation past the training length."""

from __future__ import annotations

import math

import pytest
import torch

import lmzoo
from lmzoo.layers.alibi import alibi_bias, alibi_slopes


def test_slopes_follow_the_papers_formula_for_8_and_12_heads():
    # 8 heads: geometric from 2^(-8/8) = 1/2 with ratio 1/2
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence 2^(-0.5 (i + 1))
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 * (i + 1)) for i in (0, 2, 4, 6)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))
    assert alibi_slopes(16)[0] == pytest.approx(2 ** -0.5) and alibi_slopes(16)[-1] == pytest.approx(2**-8)


def test_bias_is_minus_slope_times_distance_and_masks_the_future():
    slopes = alibi_slopes(4)
    b = alibi_bias(slopes, T=3, S=5)  # 3 queries at slots 2, 3, 4 over keys 0..4
    assert b.shape == (1, 4, 3, 5)
    for h in range(4):
        for i in range(3):
            for j in range(5):
                want = -slopes[h].item() * (2 + i - j) if j <= 2 + i else -math.inf
                assert b[0, h, i, j].item() == pytest.approx(want)


def test_model_trained_at_128_evaluates_at_512():
    m = lmzoo.build("gpt2-debug", pos_emb="alibi", block_size=128)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(3):
        x = torch.randint(0, 97, (2, 128))
        loss = m(x, x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x = torch.randint(0, 97, (1, 512))
    with torch.no_grad():
        out = m(x, x)
    assert out.logits.shape == (1, 512, 97) and torch.isfinite(out.loss)
    assert m.max_positions() is None


def test_learned_positions_cannot_evaluate_past_their_table():
    """How the extrapolation table treats learned positions: not applicable past block_size."""
    m = lmzoo.build("gpt2-debug", block_size=128).eval()
    with pytest.raises(ValueError, match="position table"):
        m(torch.randint(0, 97, (1, 512)))


def test_sdpa_and_reference_attention_agree_with_alibi():
    torch.manual_seed(0)
    a = lmzoo.build("gpt2-debug", pos_emb="alibi", attn_backend="sdpa").eval()
    b = lmzoo.build("gpt2-debug", pos_emb="alibi", attn_backend="reference").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 30))
    torch.testing.assert_close(a(x).logits, b(x).logits, atol=1e-5, rtol=1e-5)
