"""Transformer-XL (models/transformer_xl.py): recurrence over segments, relative positions, no gradient
into the memory, training over a continuous stream with the shared trainer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.data import TokenLoader, prepare
from lmzoo.models.transformer_xl import RelativeAttention, TransformerXLConfig, sinusoid_encoding


@pytest.mark.parametrize("segment", [1, 5, 8])
def test_segment_by_segment_equals_one_pass_over_the_whole_sequence(segment):
    m = lmzoo.build("transformer-xl-debug").eval()
    x = torch.randint(0, 97, (2, 24))
    full = m(x).logits  # one pass: every query sees every earlier token
    memory = m.init_cache(2, max_len=24)  # a memory at least as long as the sequence so far
    parts = [m(x[:, t : t + segment], cache=memory).logits for t in range(0, 24, segment)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


def test_relative_scores_follow_the_papers_formula():
    cfg = TransformerXLConfig(n_layer=1, n_head=2, n_embd=16, attn_backend="reference")
    attn = RelativeAttention(cfg).eval()
    for p in (attn.u, attn.v):
        torch.nn.init.normal_(p)
    B, M, T, C = 1, 3, 4, 16
    mem, h = torch.randn(B, M, C), torch.randn(B, T, C)
    S = M + T
    r = sinusoid_encoding(torch.arange(S - 1, -1, -1), C)
    mask = (torch.arange(S)[None, :] <= torch.arange(M, S)[:, None])[None, None]
    got = attn(h, mem, r, mask)
    # by hand: score(i, j) = (q_i + u).k_j + (q_i + v).W_R R_{i-j}, i at slot M + i
    hm = torch.cat([mem, h], 1)
    q = attn.q(h).view(T, 2, 8)
    k, v = attn.kv(hm).view(S, 2, 2, 8).unbind(1)
    out = torch.zeros(T, 2, 8)
    for head in range(2):
        for i in range(T):
            scores = torch.full((S,), -math.inf)
            for j in range(M + i + 1):
                rel = attn.r_net(sinusoid_encoding(torch.tensor([M + i - j]), C))[0].view(2, 8)[head]
                scores[j] = (q[i, head] + attn.u[head]) @ k[j, head] + (q[i, head] + attn.v[head]) @ rel
            out[i, head] = torch.softmax(scores / math.sqrt(8), 0) @ v[:, head]
    want = attn.proj(out.reshape(1, T, 16))
    assert (got - want).abs().max() <= 1e-5


def test_no_gradient_flows_into_the_memory():
    m = lmzoo.build("transformer-xl-debug", tie_embeddings=False).train()
    memory = m.init_cache(2)
    first = torch.randint(0, 10, (2, 16))  # tokens 0..9 appear only in the first segment
    m(first, first, cache=memory)
    assert all(not t.requires_grad and t.grad_fn is None for t in memory.mems)
    second = torch.randint(10, 20, (2, 16))
    m.zero_grad()
    m(second, second, cache=memory).loss.backward()
    g = m.embed.weight.grad
    assert g[:10].abs().sum() == 0  # nothing reaches the first segment's embeddings
    assert g[10:20].abs().sum() > 0


def test_memory_is_bounded_and_may_be_longer_at_evaluation():
    m = lmzoo.build("transformer-xl-debug", mem_len=8).eval()
    x = torch.randint(0, 97, (1, 40))
    short = m.init_cache(1)  # the training mem_len
    assert short.mem_len == 8
    for t in range(0, 40, 8):
        a = m(x[:, t : t + 8], cache=short).logits
        assert short.length == 8
    long = m.init_cache(1, max_len=32)  # evaluation with a longer memory than training
    for t in range(0, 40, 8):
        b = m(x[:, t : t + 8], cache=long).logits
    assert long.length == 32 and (a - b).abs().max() > 1e-4


def test_stream_loader_continues_each_row_where_it_stopped(tmp_path: Path):
    data = prepared(tmp_path)
    loader = TokenLoader(data, "train", 8, 3, mode="stream")
    stream = np.fromfile(data / "train.bin", dtype=loader.dtype).astype(np.int64)
    starts = loader._starts(0)
    for step in range(3):
        x, _ = loader.next_batch()
        for row in range(3):  # row i reads its lane's windows one after the other
            begin = starts[row] + 8 * step
            assert np.array_equal(x[row].numpy(), stream[begin : begin + 8])
    assert len(set(starts)) == 3


def prepared(tmp_path: Path) -> Path:
    text = "".join(f"{w} the quick brown fox {i} jumps.\n" for i, w in enumerate(["alpha", "beta"] * 150))
    (tmp_path / "c.txt").write_text(text)
    return prepare(str(tmp_path / "c.txt"), tmp_path / "prep", tokenizer="char")


def test_trainer_carries_the_memory_across_consecutive_segments(tmp_path: Path):
    data = prepared(tmp_path)
    summary = lmzoo.train(
        model="transformer-xl-debug", model_args={"mem_len": 16}, data_dir=str(data), out_dir=str(tmp_path / "run"),
        batch_size=2, block_size=16, max_steps=4, eval_interval=4, eval_iters=2, warmup_steps=1, device="cpu",
        dtype="float32", progress=False, sample_tokens=0, recurrence=True,
    )
    assert math.isfinite(summary["val_loss"])
