"""Instruction tuning: prompt/response and chat data, loss on the responses only, packing.

**Data.** JSONL, one example a line, either ``{"prompt": ..., "response": ...}`` or a chat
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

**Template.** A pretrained model whose tokenizer brings a chat template (SmolLM2-Instruct's ChatML...) is
tuned in that template (:func:`lmzoo.serving.templates.chat_segments`), the format it will be prompted in.
Otherwise lmzoo's own (plain text, so any tokenizer encodes it; ``<|endoftext|>`` is the end token)::

    <|system|>\\n{content}\\n          (optional, once, first)
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}<|endoftext|>
    ... more user/assistant turns ...

**Response-only loss.** The model should learn to *answer*, not to predict the user's words: a target
is the next token where that token belongs to an assistant turn (its content and its end token), and
``-1`` elsewhere; ``lm_loss`` ignores ``-1``. The header ``<|assistant|>\\n`` itself is prompt.

**Packing.** Short examples are concatenated into rows of ``block_size + 1`` tokens (an example never
straddles two rows; the rest of a row is padding with target -1), so few positions are wasted. Packed
examples can attend to earlier examples in the row (the usual, cheap packing); the end token separates
them and the model learns that what comes before it is unrelated. They also start at a later position
than they would alone. ``packing=False`` gives every example a row of its own (litgpt's default): each
is trained exactly as it is seen at inference, at the cost of the padding (a test shows the difference).

**Training.** :func:`instruct_loaders` gives the shared trainer in-memory loaders of packed rows
(``Trainer(cfg, model=..., tokenizer=..., data=(train, val))``; ``lmzoo finetune --instruct``): the
model's own loss, which ignores -1, is then the response-only loss.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmzoo.config import loads_json
from lmzoo.errors import DataError
from lmzoo.serving.templates import chat_segments, end_of_turn, render_chat, template_of
from lmzoo.tokenizer import EOT

Message = dict[str, str]


def read_jsonl(path: str | Path) -> list[list[Message]]:
    """Examples of a JSONL file as chats (a prompt/response line becomes a user and an assistant turn)."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 JSONL file (byte {e.start} is not UTF-8)") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = loads_json(line, f"{path}:{n}", DataError)
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        out.append(to_messages(row, f"{path}:{n}"))
    return out


def to_messages(row: dict[str, Any], where: str = "example") -> list[Message]:
    """``{"prompt", "response"}`` or ``{"messages": [...]}`` -> a list of ``{"role", "content"}``."""
    if "messages" in row:
        msgs = row["messages"]
        for m in msgs:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs role system/user/assistant and a string content")
        return msgs
    if "prompt" in row and "response" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise DataError(f"{where}: expected keys prompt/response or messages, got {sorted(row)}")


def encode_chat(tok, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a chat in the template, and per token whether it is trained on (assistant content
    and its end token). ``add_generation_prompt`` ends where the assistant's reply begins (for generation).
    The model's own chat template when its tokenizer has one, else lmzoo's (module docstring)."""
    ids: list[int] = []
    mask: list[bool] = []

    def add(piece: list[int], train: bool) -> None:
        ids.extend(piece)
        mask.extend([train] * len(piece))

    if template_of(tok) is not None:
        if add_generation_prompt:
            add(tok.encode(render_chat(messages, tok, "model")[0]), False)
        else:
            for text, trained in chat_segments(tok, messages):
                add(tok.encode(text), trained)
        return ids, mask
    end = tok.encode(EOT, allow_special=True)

    for m in messages:
        add(tok.encode(f"<|{m['role']}|>\n"), False)
        if m["role"] == "assistant":
            add(tok.encode(m["content"]), True)
            add(end, True)
        else:
            add(tok.encode(m["content"] + "\n"), False)
    if add_generation_prompt:
        add(tok.encode("<|assistant|>\n"), False)
    return ids, mask


def pack(
    examples: Sequence[tuple[list[int], list[bool]]], block_size: int, pad_id: int = 0, packing: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy packing into ``(inputs (N, block_size), targets (N, block_size))`` int64 tensors.

    ``targets[n, t]`` is token t+1 of row n where that token is trained on, else -1. An example longer
    than ``block_size + 1`` tokens raises DataError (truncating would cut the response).
    ``packing=False``: one example per row, the rest padding.
    """
    rows: list[tuple[list[int], list[bool]]] = []
    cur_ids: list[int] = []
    cur_mask: list[bool] = []
    for ids, mask in examples:
        if len(ids) > block_size + 1:
            raise DataError(f"an example of {len(ids)} tokens does not fit block_size {block_size} + 1")
        if cur_ids and (not packing or len(cur_ids) + len(ids) > block_size + 1):
            rows.append((cur_ids, cur_mask))
            cur_ids, cur_mask = [], []
        cur_ids, cur_mask = cur_ids + ids, cur_mask + mask
    if cur_ids:
        rows.append((cur_ids, cur_mask))
    x = torch.full((len(rows), block_size + 1), pad_id, dtype=torch.long)
    keep = torch.zeros((len(rows), block_size + 1), dtype=torch.bool)
    for n, (ids, mask) in enumerate(rows):
        x[n, : len(ids)] = torch.tensor(ids)
        keep[n, : len(mask)] = torch.tensor(mask)
    targets = torch.where(keep[:, 1:], x[:, 1:], torch.full_like(x[:, 1:], -1))
    return x[:, :-1].contiguous(), targets.contiguous()


def make_task(kind: str, n: int, seed: int = 0, length: int = 4) -> list[list[Message]]:
    """A generated instruction set: ``"reverse"`` (reverse a lowercase word of ``length`` letters) or
    ``"add"`` (sum of two 2-digit numbers)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if kind == "reverse":
            word = "".join(rng.choice("abcdefghij") for _ in range(length))
            prompt, response = f"reverse {word}", word[::-1]
        elif kind == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt, response = f"{a}+{b}", str(a + b)
        else:
            raise DataError(f"unknown task {kind!r} (reverse, add)")
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    return out


@torch.no_grad()
def exact_match(model, tok, chats: Sequence[Sequence[Message]], max_new_tokens: int = 8) -> float:
    """Fraction of chats whose last assistant turn the model reproduces exactly (greedy decoding,
    stopping at the end token) given everything before it."""
    from lmzoo.decoding.generate import generate

    was_training = model.training
    model.eval()
    ends = end_ids(tok)
    prompts = [encode_chat(tok, c[:-1], add_generation_prompt=True)[0] for c in chats]
    outs = generate(model, prompts, max_new_tokens, temperature=0, stop_tokens=ends)
    hits = sum(tok.decode([t for t in o if t not in ends]) == c[-1]["content"] and o[-1:] in ([e] for e in ends)
               for o, c in zip(outs, chats))
    model.train(was_training)
    return hits / len(chats)


def end_ids(tok) -> list[int]:
    """The token ids that end an assistant turn: the chat template's end-of-turn tokens, else lmzoo's end token."""
    if template_of(tok) is not None:
        return [tok.special_tokens[t] for t in end_of_turn(tok)]
    return [tok.encode(EOT, allow_special=True)[-1]]


class PackedLoader:
    """Endless ``(x, y)`` batches of packed instruction rows held in memory, with the
    :class:`lmzoo.data.TokenLoader` protocol the shared trainer reads (``Trainer(data=...)``).

    ``random``: batch ``s`` draws ``batch_size`` rows from a generator seeded with ``(seed, s)``;
    ``sequential``: batch ``s`` is rows ``s * batch_size ...`` (mod N), for a fixed validation pass. Either
    way a batch is a pure function of the step, so ``state_dict()`` (the step) is all that resuming needs.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int = 0,
                 mode: str = "random", device: str | torch.device = "cpu", vocab_size: int | None = None):
        if mode not in ("random", "sequential"):
            raise DataError(f"unknown mode {mode!r} (random, sequential)")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed, self.mode = batch_size, seed, mode
        self.block_size = inputs.shape[1]
        self.device = torch.device(device)
        self.meta = {"vocab_size": vocab_size or int(inputs.max()) + 1, "rows": inputs.shape[0],
                     "trained_tokens": int((targets >= 0).sum())}
        self.step = 0

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.inputs.shape[0]
        if self.mode == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            rows = torch.randint(0, n, (self.batch_size,), generator=g)
        else:
            rows = (step * self.batch_size + torch.arange(self.batch_size)) % n
        return self.inputs[rows].to(self.device), self.targets[rows].to(self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "mode": self.mode, "block_size": self.block_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("mode", "block_size", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}")
        self.step = int(state["step"])


def instruct_loaders(
    tok, train: str | Path | Sequence[Sequence[Message]], block_size: int, batch_size: int,
    val: str | Path | Sequence[Sequence[Message]] | None = None, val_fraction: float = 0.1, seed: int = 0,
    device: str | torch.device = "cpu", packing: bool = True,
) -> tuple[PackedLoader, PackedLoader]:
    """``(train, val)`` loaders of packed, response-masked rows from a JSONL path or a list of chats.

    Without ``val``, the last ``val_fraction`` of the examples (at least one) is held out; the rest
    is shuffled with ``seed`` before packing. ``packing=False``: one example per row (see :func:`pack`).
    """
    chats = read_jsonl(train) if isinstance(train, (str, Path)) else list(train)
    if val is None:
        if len(chats) < 2:
            raise DataError(f"{train}: need at least 2 examples to hold one out for validation")
        n_val = max(1, int(len(chats) * val_fraction))
        chats, val_chats = chats[:-n_val], chats[-n_val:]
    else:
        val_chats = read_jsonl(val) if isinstance(val, (str, Path)) else list(val)
    if not chats or not val_chats:
        raise DataError("instruction data: no training or no validation examples")
    random.Random(seed).shuffle(chats)
    pad = tok.encode(EOT, allow_special=True)[-1]
    loaders = []
    for part, mode in ((chats, "random"), (val_chats, "sequential")):
        x, y = pack([encode_chat(tok, c) for c in part], block_size, pad_id=pad, packing=packing)
        loaders.append(PackedLoader(x, y, batch_size, seed, mode, device, tok.vocab_size))
    return loaders[0], loaders[1]
