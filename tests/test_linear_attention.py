"""Linear attention (layers/linear_attention.py): the parallel form is the RNN, and decoding is O(1) memory."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.layers.linear_attention import (
    FEATURE_MAPS,
    causal_linear_attention,
    elu_plus_one,
    linear_attention_step,
)


def features(B, nh, nkv, T, d):
    q, k, v = torch.randn(B, nh, T, d), torch.randn(B, nkv, T, d), torch.randn(B, nkv, T, d)
    return elu_plus_one(q), elu_plus_one(k), v


@pytest.mark.parametrize("nh,nkv,T,chunk", [(4, 4, 37, 8), (4, 2, 64, 16), (6, 1, 10, 64), (2, 2, 9, 1)])
def test_parallel_and_recurrent_forms_agree(nh, nkv, T, chunk):
    q, k, v = features(2, nh, nkv, T, 8)
    par, (S, z) = causal_linear_attention(q, k, v, chunk=chunk)
    state, steps = None, []
    for t in range(T):
        y, state = linear_attention_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        steps.append(y)
    assert (torch.cat(steps, 2) - par).abs().max() <= 1e-4
    assert (state[0] - S).abs().max() <= 1e-4 and (state[1] - z).abs().max() <= 1e-4


def test_chunked_form_equals_the_quadratic_formula_and_continues_from_a_state():
    q, k, v = features(1, 2, 2, 20, 4)
    A = (q @ k.transpose(-1, -2)).tril()  # phi(q_i).phi(k_j) for j <= i
    want = (A @ v) / A.sum(-1, keepdim=True)
    got, _ = causal_linear_attention(q, k, v, chunk=6)
    assert (got - want).abs().max() <= 1e-4
    _, state = causal_linear_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], chunk=3)
    rest, _ = causal_linear_attention(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], state, chunk=5)
    assert (rest - want[:, :, 7:]).abs().max() <= 1e-4


def test_decoding_memory_is_constant_in_generated_length():
    m = lmzoo.build("gpt2-debug", attention="linear", pos_emb="none").eval()
    cfg = m.config
    cache = m.init_cache(1, 8)
    expected = 4 * cfg.n_layer * cfg.n_kv_head * (cfg.head_dim**2 + cfg.head_dim)  # S and z, float32
    assert cache.nbytes == expected == m.init_cache(1, 100_000).nbytes  # max_len does not matter
    tok = torch.tensor([[1]])
    with torch.no_grad():
        for step in range(300):  # far past block_size (32)
            tok = m(tok, cache=cache).logits[:, -1:].argmax(-1)
            if step in (0, 299):
                assert cache.nbytes == expected
    assert cache.pos == 300


def test_generation_runs_past_the_training_context():
    m = lmzoo.build("gpt2-debug", attention="linear", pos_emb="none").eval()
    out = lmzoo.generate(m, [[1, 2, 3]], max_new_tokens=80, temperature=0)
    assert len(out[0]) == 80  # block_size is 32: the state, not a window, carries the context


def test_feature_map_is_pluggable():
    assert set(FEATURE_MAPS) >= {"elu", "relu", "softplus"}
    a = lmzoo.build("gpt2-debug", attention="linear", linear_feature_map="elu").eval()
    b = lmzoo.build("gpt2-debug", attention="linear", linear_feature_map="softplus").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (1, 12))
    assert (a(x).logits - b(x).logits).abs().max() > 1e-4
    with pytest.raises(lmzoo.LmzooError, match="RoPE"):
        lmzoo.build("gpt2-debug", attention="linear", pos_emb="rope")
