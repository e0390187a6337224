"""Instruction tuning: response-only targets, packing, and a generated task that tuning teaches."""

from __future__ import annotations

import json

import pytest
import torch

import lmzoo
from lmzoo.errors import DataError
from lmzoo.peft.instruct import encode_chat, exact_match, make_task, pack, read_jsonl, tune
from lmzoo.tokenizer import ByteTokenizer


def test_targets_only_on_response_tokens_and_packing():
    tok = ByteTokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = encode_chat(tok, chat)
    assert tok.decode(ids) == "<|user|>\nhi\n<|assistant|>\nyo<|endoftext|>"
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("yo") + [256]
    x, y = pack([(ids, mask)] * 3, block_size=2 * len(ids))
    assert x.shape == (2, 2 * len(ids))  # two examples fit in the first row, the third starts the next
    trained = y[y >= 0].tolist()
    assert trained == (tok.encode("yo") + [256]) * 3  # rows hold block_size + 1 tokens: nothing is cut
    with pytest.raises(DataError, match="does not fit"):
        pack([(ids, mask)], block_size=4)


def test_reads_prompt_response_and_chat_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "response": "b"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "x"}, {"role": "user", "content": "v"},
                          {"role": "assistant", "content": "y"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    chats = read_jsonl(p)
    assert chats[0][1] == {"role": "assistant", "content": "b"} and len(chats[1]) == 5
    _, mask = encode_chat(ByteTokenizer(), chats[1])
    assert sum(mask) == 4  # "x" + end, "y" + end: both assistant turns are trained on
    p.write_text('{"question": 1}')
    with pytest.raises(DataError, match="prompt/response or messages"):
        read_jsonl(p)


def test_tuning_teaches_string_reversal():
    """Held-out (unseen words) exact match: 0% before, >= 80% after 250 steps (see docs/instruction-tuning.md)."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    held = make_task("reverse", 100, seed=1, length=3)
    unseen = {c[0]["content"] for c in held}
    train = [c for c in make_task("reverse", 2000, seed=0, length=3) if c[0]["content"] not in unseen]
    x, y = pack([encode_chat(tok, c) for c in train], block_size=64)
    model = lmzoo.build("gpt2-debug", vocab_size=257, block_size=64, n_embd=64, n_head=4, n_kv_head=4)
    assert exact_match(model, tok, held) == 0.0
    tune(model, x, y, steps=250, lr=3e-3, batch_size=16)
    assert exact_match(model, tok, held) >= 0.8
