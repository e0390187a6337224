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


def _losses_past_the_training_length(text: str, pos_emb: str, lengths=(32, 128, 256)) -> dict[int, float]:
    """A tiny char model trained 120 steps at context 32 on ``text``; its mean loss over the same 4,096
    held-out tokens cut into windows of each length."""
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:100_000] + text[-4_200:]])
    train, val = ids[:100_000], ids[100_000:]
    torch.manual_seed(0)
    m = lmzoo.build("gpt2-debug", pos_emb=pos_emb, block_size=32, vocab_size=len(chars))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        ix = torch.randint(0, len(train) - 33, (16,), generator=g).tolist()
        x = torch.stack([train[i : i + 32] for i in ix])
        y = torch.stack([train[i + 1 : i + 33] for i in ix])
        opt.zero_grad()
        m(x, y).loss.backward()
        opt.step()
    m.eval()
    out = {}
    with torch.no_grad():
        for n in lengths:
            res = m(val[:4096].view(-1, n), val[1:4097].view(-1, n))
            assert res.logits.shape == (4096 // n, n, len(chars))
            out[n] = res.loss.item()
    return out


def test_alibi_trained_at_32_keeps_its_loss_at_4x_and_8x_the_length(shakespeare_path):
    """Train short, test long: ALiBi's loss at 4x and 8x the training context is no worse than at the
    context it was trained on (more context, same biases), while RoPE, trained the same way, degrades
    (positions it never saw), which shows the comparison can fail."""
    text = shakespeare_path.read_text()
    alibi = _losses_past_the_training_length(text, "alibi")
    rope = _losses_past_the_training_length(text, "rope")
    assert alibi[128] <= alibi[32] + 0.01 and alibi[256] <= alibi[32] + 0.01, alibi
    assert rope[128] > rope[32] + 0.1 and rope[256] > rope[32] + 0.1, rope
    assert lmzoo.build("gpt2-debug", pos_emb="alibi").max_positions() is None


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
