"""Cross-layer KV sharing (layers/cross_layer_attention.py): one K/V set per group of adjacent layers."""

from __future__ import annotations

import pytest
import torch

import lmzoo


@pytest.mark.parametrize("share", [2, 4])
def test_cache_memory_is_divided_by_the_sharing_factor(share):
    full = lmzoo.build("gpt2-debug", n_layer=4).init_cache(2, 32)
    shared = lmzoo.build("gpt2-debug", n_layer=4, kv_share_every=share).init_cache(2, 32)
    assert shared.nbytes * share == full.nbytes


def test_only_the_first_layer_of_a_group_projects_keys_and_values():
    m = lmzoo.build("gpt2-debug", n_layer=4, kv_share_every=2, bias=False)
    base = lmzoo.build("gpt2-debug", n_layer=4, bias=False)
    cfg = m.config
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, 2 * cfg.n_kv_head * cfg.head_dim
    assert [b.mixer.qkv.out_features for b in m.blocks] == [q_rows + kv_rows, q_rows] * 2
    assert base.num_params() - m.num_params() == 2 * kv_rows * cfg.n_embd


def test_cached_decoding_matches_full_forward_with_a_short_last_group():
    m = lmzoo.build("gpt2-debug", n_layer=5, kv_share_every=3).eval()  # groups of 3 and 2 layers
    x = torch.randint(0, 97, (2, 20))
    full = m(x).logits
    cache = m.init_cache(2, 20)
    assert cache.k.shape[0] == 2
    parts = [m(x[:, :7], cache=cache).logits] + [m(x[:, t : t + 1], cache=cache).logits for t in range(7, 20)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


def test_gradients_reach_the_shared_projection_from_every_layer_of_its_group():
    m = lmzoo.build("gpt2-debug", n_layer=2, kv_share_every=2)
    x = torch.randint(0, 97, (2, 12))
    out = m.blocks[1].mixer  # the layer that reuses layer 0's keys/values
    w = m.blocks[0].mixer.qkv.weight
    kv_rows = slice(m.config.n_head * m.config.head_dim, None)
    # the loss through layer 1 alone still moves layer 0's K/V rows
    h, ctx = m.begin(x, None)
    m.blocks[0](h, ctx, 0)  # the group's first layer leaves its keys/values in the chunk's context
    y, _ = out(m.blocks[1].mixer_norm(h), kv=ctx.shared[0])
    y.sum().backward()
    assert w.grad[kv_rows].abs().sum() > 0
