"""Generation: greedy equals recomputation, batches equal single prompts, sampling rules, stops."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.decoding.generate import generate, sample_next, stream
from lmzoo.errors import ConfigError


def greedy_by_recomputation(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(params=["learned", "rope"])
def model(request):
    torch.manual_seed(0)
    return lmzoo.build("gpt2-debug", pos_emb=request.param).eval()


def test_greedy_with_cache_equals_recomputing_everything(model):
    prompt = [5, 17, 3, 9]
    assert generate(model, [prompt], 20, temperature=0) == [greedy_by_recomputation(model, prompt, 20)]


def test_batch_of_different_lengths_equals_each_prompt_alone(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batched = generate(model, prompts, 12, temperature=0)
    alone = [generate(model, [p], 12, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    kw = dict(temperature=1.0, top_k=20, seed=3)
    a = generate(model, [[1, 2], [3]], 15, **kw)
    assert a == generate(model, [[1, 2], [3]], 15, **kw)
    assert a != generate(model, [[1, 2], [3]], 15, **{**kw, "seed": 4})


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: p=0.8 keeps tokens 0 and 1 only
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert sample_next(logits[:1], 0.0).item() == 0


def test_stop_tokens_end_a_row_and_are_included(model):
    prompt = [5, 17, 3, 9]
    free = generate(model, [prompt], 20, temperature=0)[0]
    stop = free[5]
    out = generate(model, [prompt], 20, temperature=0, stop_tokens=[stop])[0]
    assert out == free[: free.index(stop) + 1]


def test_generation_runs_past_a_learned_context_by_sliding_the_window():
    torch.manual_seed(0)
    m = lmzoo.build("gpt2-debug").eval()  # learned positions, block_size 32
    prompt = [1, 2, 3]
    out = generate(m, [prompt], 80, temperature=0)[0]
    assert len(out) == 80
    # inside the context the result is exactly greedy decoding
    assert out[: 32 - len(prompt)] == greedy_by_recomputation(m, prompt, 32 - len(prompt))


def test_stream_yields_one_token_per_row_per_step(model):
    steps = list(stream(model, [[1, 2], [3, 4, 5]], 6, temperature=0))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)


@pytest.mark.parametrize(
    "kw,needle",
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")],
)
def test_invalid_sampling_settings_are_named(model, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        generate(model, [[1]], 3, **kw)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ConfigError, match="at least one token"):
        generate(model, [[]], 3)
