"""The static KV cache and the compiled decode step compute what the dynamic cache computes."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.decoding.generate import generate, left_pad
from lmzoo.decoding.static import _CACHES, _decode_step, generate_static, static_cache
from lmzoo.errors import ConfigError

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(params=[("gpt2-debug", "learned"), ("gpt2-debug", "rope"), ("llama-debug", None)], ids=str)
def model(request):
    preset, pos_emb = request.param
    torch.manual_seed(0)
    kw = {"pos_emb": pos_emb} if pos_emb else {}
    return lmzoo.build(preset, init_std=0.1, **kw).eval()  # peaked logits: no near-ties in argmax


def test_static_greedy_equals_dynamic_greedy_token_for_token(model):
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, and a left-padded batch
        assert generate_static(model, prompts, 20) == generate(model, prompts, 20, temperature=0)


@torch.no_grad()
def test_static_cache_logits_match_dynamic_cache_at_every_step(model):
    ids, pad = left_pad(PROMPTS)
    B, T = ids.shape
    dyn = model.init_cache(B, T + 10, pad=pad)
    sta = static_cache(model, B, T + 10, pad=pad)
    a = model(ids, cache=dyn).logits
    b = model(ids, cache=sta).logits
    real = torch.arange(T)[None, :] >= pad[:, None]  # padding slots compute nothing meaningful
    assert torch.allclose(a[real], b[real], atol=1e-5)
    tok = a[:, -1].argmax(-1, keepdim=True)
    for _ in range(10):
        a = model(tok, cache=dyn).logits[:, -1]
        b = _decode_step(model, tok, sta)
        assert torch.allclose(a, b, atol=1e-5)
        tok = a.argmax(-1, keepdim=True)
    assert sta.pos == dyn.pos == T + 10


def test_decode_step_compiles_to_one_graph_for_every_token(model):
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's graph, run as is: counts (re)compilations
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(_decode_step, backend=counting_backend, fullgraph=True)
    got = generate_static(model, PROMPTS, 12, step_fn=step)
    assert got == generate(model, PROMPTS, 12, temperature=0)
    assert len(graphs) == 1  # no recompilation as the position advances: one CUDA graph on a GPU


def test_stop_tokens_end_a_row_and_sampling_is_seeded(model):
    free = generate_static(model, [PROMPTS[0]], 16)[0]
    cache = _CACHES[model][1]
    assert generate_static(model, [PROMPTS[0]], 16)[0] == free and _CACHES[model][1] is cache  # reset, not new
    stop = free[4]
    assert generate_static(model, [PROMPTS[0]], 16, stop_tokens=[stop])[0] == free[: free.index(stop) + 1]
    kw = dict(temperature=1.0, top_k=20, seed=3)
    assert generate_static(model, PROMPTS, 8, **kw) == generate_static(model, PROMPTS, 8, **kw)


def test_models_without_a_plain_kv_cache_or_past_their_positions_are_refused():
    with pytest.raises(ConfigError, match="no static decoding"):
        generate_static(lmzoo.build("mistral-debug"), [[1, 2]], 4)
    with pytest.raises(ConfigError, match="positions"):
        generate_static(lmzoo.build("gpt2-debug"), [[1, 2]], 40)  # block_size 32
