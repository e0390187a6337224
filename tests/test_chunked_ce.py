"""Chunked linear + cross-entropy equals the plain path; a padded vocabulary keeps the gpt2 contract."""

import pytest
import torch

from lmzoo.layers.chunked_ce import linear_cross_entropy
from lmzoo.models import build_model, preset_config
from lmzoo.models.base import lm_loss


def _plain(h, w, y, vocab):
    return lm_loss((h @ w.t())[..., :vocab], y)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_match_plain_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 21, 16, generator=g, dtype=torch.float64)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, 37, (3, 21), generator=g)
    y[0, :5] = -1  # ignored positions (prompts, padding)
    vocab = 37  # rows 37..39 are vocabulary padding: never scored
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _plain(h1, w1, y, vocab)
    got = linear_cross_entropy(h2, w2, y, chunk=chunk, vocab_size=vocab)
    (2.5 * ref).backward()
    (2.5 * got).backward()
    # float64 inputs; the plain path casts the logits to float32, hence 1e-6 rather than 1e-12
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-6)
    assert torch.allclose(w2.grad, w1.grad, atol=1e-6)
    assert w2.grad[vocab:].abs().max() == 0  # padding rows get no gradient


def test_chunked_cross_entropy_without_grad_equals_plain():
    h, w = torch.randn(50, 8), torch.randn(30, 8)
    y = torch.randint(0, 30, (50,))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, y, chunk=16), _plain(h, w, y, 30), atol=1e-5)


def test_gpt_with_chunked_ce_and_padded_vocab_trains_like_the_plain_model():
    torch.manual_seed(0)
    plain = build_model("gpt2", preset_config("gpt2-debug", dropout=0.0))
    fast = build_model("gpt2", preset_config("gpt2-debug", dropout=0.0, vocab_multiple=128, ce_chunk=24))
    assert fast.embed.weight.shape[0] == 128 and plain.embed.weight.shape[0] == 97
    with torch.no_grad():  # the same weights; the padding rows stay whatever they are
        sd = plain.state_dict()
        for k, v in fast.state_dict().items():
            v[: sd[k].shape[0]].copy_(sd[k])
    x = torch.randint(0, 97, (2, 32))
    y = torch.randint(0, 97, (2, 32))
    lp, lf = plain(x, y).loss, fast(x, y).loss
    assert torch.allclose(lp, lf, atol=1e-5)
    lp.backward()
    lf.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad[: p.shape[0]], atol=1e-5), name
    logits = fast(x).logits
    assert logits.shape == (2, 32, 97)  # padded columns are never returned, so never sampled


def test_gpt2_preset_parameter_count_unchanged_by_default():
    cfg = preset_config("gpt2")
    assert cfg.vocab_multiple == 1 and cfg.ce_chunk == 0
    with torch.device("meta"):
        model = build_model("gpt2", cfg)
    assert model.num_params() == 124_439_808


def test_padded_vocabulary_is_refused_by_the_hf_export(tmp_path):
    from lmzoo import to_hf
    from lmzoo.errors import ConfigError

    model = build_model("gpt2", preset_config("gpt2-debug", n_kv_head=4, vocab_multiple=128))
    with pytest.raises(ConfigError, match="vocab_multiple=128"):
        to_hf(model, tmp_path / "hf")
