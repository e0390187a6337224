"""Infini-attention (layers/infini_attention.py, convert/infini.py): local attention + a bounded
compressive memory, and the conversion of a pretrained model."""

from __future__ import annotations

import pytest
import torch
import transformers

import lmzoo
from lmzoo.layers.infini_attention import sigma, update_memory
from lmzoo.models.infini import to_infini

SEG = 8


def pair(family: str = "gpt2-debug", **kw):
    """A softmax model and its Infini-attention twin with the same weights."""
    base = lmzoo.build(family, **kw).eval()
    return base, to_infini(base, segment=SEG).eval()


@pytest.mark.parametrize("family,kw", [("gpt2-debug", {"pos_emb": "rope"}), ("llama-debug", {})])
def test_a_single_segment_is_plain_softmax_attention(family, kw):
    base, infini = pair(family, **kw)
    x = torch.randint(0, 97, (2, SEG))
    assert (infini(x).logits - base(x).logits).abs().max() <= 1e-5


def test_with_the_memory_gated_off_each_segment_is_local_attention():
    base, infini = pair("gpt2-debug", pos_emb="rope")
    for block in infini.blocks:
        block.mixer.gate.data.fill_(-1e4)  # sigmoid(beta) == 0: the memory path is off
    x = torch.randint(0, 97, (2, 3 * SEG))
    got = infini(x).logits
    for s in range(3):  # RoPE is relative: each segment alone is the softmax model on that segment
        seg = x[:, s * SEG : (s + 1) * SEG]
        assert (got[:, s * SEG : (s + 1) * SEG] - base(seg).logits).abs().max() <= 1e-4
    for block in infini.blocks:
        block.mixer.gate.data.fill_(0.0)  # memory on: later segments now see earlier ones
    assert (infini(x).logits[:, SEG:] - got[:, SEG:]).abs().max() > 1e-4


def test_memory_does_not_grow_with_input_length():
    m = lmzoo.build("gpt2-debug", attention="infini", pos_emb="rope", infini_segment=SEG).eval()
    cfg = m.config
    cache = m.init_cache(1)
    size = cache.nbytes
    assert size == m.init_cache(1, 10_000).nbytes  # max_len does not apply
    per_layer = 4 * cfg.n_kv_head * (cfg.head_dim**2 + cfg.head_dim + 3 * SEG * cfg.head_dim)  # M, z, segment
    assert size == cfg.n_layer * per_layer
    with torch.no_grad():
        for _ in range(40):  # 600 tokens in uneven chunks: 75 segments
            m(torch.randint(0, 97, (1, 15)), cache=cache)
            assert cache.nbytes == size
    assert cache.pos == 600


def test_chunked_input_equals_one_pass():
    m = lmzoo.build("llama-debug", attention="infini", infini_segment=SEG, infini_delta_rule=True).eval()
    x = torch.randint(0, 97, (2, 5 * SEG + 3))
    full = m(x).logits
    cache = m.init_cache(2)
    parts = [m(x[:, t : t + 11], cache=cache).logits for t in range(0, x.shape[1], 11)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


def test_delta_rule_does_not_store_the_same_association_twice():
    B, nkv, d = 1, 1, 4
    k, v = torch.randn(B, nkv, 1, d), torch.randn(B, nkv, 1, d)
    M, z = torch.zeros(B, nkv, d, d), torch.zeros(B, nkv, d)
    M1, z1 = update_memory(M, z, sigma(k), v, delta_rule=True)
    M2, _ = update_memory(M1, z1, sigma(k), v, delta_rule=True)
    assert (M2 - M1).abs().max() <= 1e-5  # the memory already returns v for k: nothing is added
    L2, _ = update_memory(M1, z1, sigma(k), v, delta_rule=False)
    assert (L2 - 2 * M1).abs().max() <= 1e-5  # the plain update adds it again


def tiny_hf_llama(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_converted_pretrained_model_equals_the_original_on_one_segment(tmp_path):
    original = lmzoo.from_hf(tiny_hf_llama(tmp_path)).eval()
    converted = to_infini(original, segment=16).eval()
    x = torch.randint(0, 97, (2, 16))
    assert (converted(x).logits - original(x).logits).abs().max() <= 1e-4
    assert {n for n, _ in converted.named_parameters()} - {n for n, _ in original.named_parameters()} == {
        f"blocks.{i}.mixer.gate" for i in range(2)
    }
    lmzoo.save(converted, tmp_path / "ckpt")  # the config says attention=infini: it loads back as such
    assert torch.equal(lmzoo.load(tmp_path / "ckpt")(x).logits, converted(x).logits)
