"""Evaluation: perplexity and bits per byte of a text, and multiple-choice scoring by log-likelihood.

Perplexity and loss depend on the tokenizer (a byte-level model predicts ~4x more tokens than a
BPE model for the same text), so models with different tokenizers are compared by **bits per
byte**: the total negative log-likelihood of the text in nats, divided by ln 2 and by the number
of UTF-8 bytes that were predicted (Gao et al. 2020, "The Pile", section 5)::

    bpb = sum_t -ln p(x_t | x_<t) / ln 2 / n_bytes

For a byte-level model one token is one byte, so ``bpb == mean loss / ln 2`` exactly. Special
tokens (the end-of-text id between documents) stand for no bytes and count 0; their NLL stays in
the total.

The text is cut into non-overlapping windows of ``block_size + 1`` tokens (every token but the
first of the text is predicted once, with between 0 and ``block_size - 1`` tokens of context).
A sliding window with a stride would give each token more context and a lower loss; this is the
cheaper, standard "chunked" estimate, the same one training's validation loss uses.

Multiple choice (docs/evaluation.md): each example is a context and several endings; the model
picks the ending with the highest log-likelihood given the context, either summed over the
ending's tokens (``acc``) or divided by the ending's length in bytes (``acc_norm``, which does not
favour short endings; the convention of the lm-eval harness for HellaSwag).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmzoo.config import loads_json
from lmzoo.errors import ConfigError, DataError, quote

LONG_INPUT_STEPS = 4  # model calls beyond which `lmzoo eval` shows a progress bar (stderr)


@dataclass
class TextEval:
    """Loss of a model on a token sequence: the figures ``lmzoo eval`` prints."""

    loss: float  # mean negative log-likelihood per predicted token (nats)
    perplexity: float  # exp(loss)
    bits_per_byte: float  # total nats / ln 2 / predicted UTF-8 bytes
    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of the predicted tokens (special tokens: 0)
    nll_nats: float  # total negative log-likelihood

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _token_bytes(tokenizer, ids: Sequence[int]) -> int:
    """UTF-8 bytes of the text ``ids`` stand for (exact bytes where the tokenizer can give them).

    Special ids (``<|endoftext|>`` between documents) are no text: they count 0 bytes, not the
    bytes of their name. Their prediction's loss still counts, as part of modelling the text."""
    special = set((getattr(tokenizer, "special_tokens", None) or {}).values())
    ids = [i for i in ids if i not in special]
    if hasattr(tokenizer, "decode_bytes"):
        return len(tokenizer.decode_bytes(list(ids)))
    return len(tokenizer.decode(list(ids)).encode("utf-8"))


def check_eval_settings(batch_size: int = 8, block_size: int | None = None, max_tokens: int | None = None,
                        limit: int | None = None) -> None:
    """ConfigError unless every given size is a positive integer (None: the default). A negative batch size
    would skip every full window and report the loss of the tail alone; a negative token or example limit
    would cut from the end: numbers that look right and are not."""
    for name, value in (("batch_size", batch_size), ("block_size", block_size), ("max_tokens", max_tokens),
                        ("limit", limit)):
        if value is None and name != "batch_size":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {quote(value)}")


def _context_length(model, block_size: int | None) -> int:
    limit = model.max_positions()
    T = block_size or getattr(model.config, "block_size", None) or limit or 1024
    if limit is not None and T > limit:
        raise ConfigError(f"block_size {T} exceeds the model's {limit} positions")
    if T < 1:
        raise ConfigError(f"block_size must be positive, got {T}")
    return T


def _bar(total: int, unit: str, progress: bool):
    """A tqdm bar on stderr for an input of ``total`` units when ``progress`` and the input is long (more
    than LONG_INPUT_STEPS model calls); a disabled one otherwise (short inputs finish at once)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc="eval", dynamic_ncols=True, mininterval=0.5,
                disable=not progress or total <= LONG_INPUT_STEPS)


@torch.inference_mode()
def sequence_nll(
    model, ids: Sequence[int] | np.ndarray | torch.Tensor, block_size: int | None = None, batch_size: int = 8,
    progress: bool = False,
) -> tuple[float, int]:
    """(total NLL in nats, tokens predicted) of ``ids`` in non-overlapping windows of ``block_size``;
    ``progress``: a bar on stderr when that takes more than a few batches."""
    check_eval_settings(batch_size, block_size)
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if ids.numel() < 2:
        raise DataError("the text to evaluate needs at least two tokens")
    T = _context_length(model, block_size)
    was_training = model.training
    model.eval()
    device = model.device
    n_full = (ids.numel() - 1) // T
    total, count = 0.0, 0
    bar = _bar(-(-n_full // batch_size) + 1, "batch", progress)
    try:
        # full windows in batches: x = ids[i*T : (i+1)*T], y shifted by one
        for start in range(0, n_full, batch_size):
            rows = range(start, min(n_full, start + batch_size))
            x = torch.stack([ids[i * T : (i + 1) * T] for i in rows]).to(device)
            y = torch.stack([ids[i * T + 1 : (i + 1) * T + 1] for i in rows]).to(device)
            logits = model(x).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
            bar.update(1)
        rest = ids.numel() - 1 - n_full * T  # the tail shorter than a window
        if rest > 0:
            x = ids[n_full * T : n_full * T + rest][None].to(device)
            y = ids[n_full * T + 1 :][None].to(device)
            logits = model(x).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return total, count


def evaluate_ids(
    model, ids: Sequence[int] | np.ndarray, tokenizer, block_size: int | None = None, batch_size: int = 8,
    progress: bool = False,
) -> TextEval:
    """Loss, perplexity and bits per byte of a token sequence (bytes counted by ``tokenizer``)."""
    nll, n = sequence_nll(model, ids, block_size, batch_size, progress)
    n_bytes = _token_bytes(tokenizer, np.asarray(ids[1:]).tolist())  # the predicted tokens' bytes
    if n_bytes == 0:
        raise DataError("the evaluated tokens decode to no bytes; bits per byte is undefined")
    loss = nll / n
    return TextEval(
        loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=nll / math.log(2) / n_bytes,
        tokens=n, bytes=n_bytes, nll_nats=nll,
    )


def evaluate_text(
    model, tokenizer, text: str, block_size: int | None = None, batch_size: int = 8, progress: bool = False
) -> TextEval:
    """Loss, perplexity and bits per byte of ``text`` under ``model``."""
    if tokenizer is None:
        raise ConfigError("evaluating a text needs the checkpoint's tokenizer, and none was saved with it")
    return evaluate_ids(model, tokenizer.encode(text), tokenizer, block_size, batch_size, progress)


def evaluate_split(
    model, data_dir: str | Path, split: str = "val", block_size: int | None = None, batch_size: int = 8,
    max_tokens: int | None = None, progress: bool = False,
) -> TextEval:
    """Loss, perplexity and bits per byte on a prepared split (``lmzoo prepare``), optionally its first
    ``max_tokens`` tokens. Bytes are counted with the data set's own tokenizer."""
    from lmzoo.data import load_meta
    from lmzoo.tokenizer import load_tokenizer

    if split not in ("train", "val"):
        raise ConfigError(f"unknown split {quote(split)}; choose train or val")
    check_eval_settings(batch_size, block_size, max_tokens)
    meta = load_meta(data_dir)
    n = int(meta[f"{split}_tokens"])
    if max_tokens:
        n = min(n, max_tokens)
    ids = np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")[:n]
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and meta["vocab_size"] > vocab:
        raise ConfigError(f"{data_dir} has vocabulary {meta['vocab_size']}, the model only {vocab}")
    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
    return evaluate_ids(model, np.asarray(ids, dtype=np.int64), tokenizer, block_size, batch_size, progress)


# -- multiple choice ----------------------------------------------------------------------------

@dataclass
class Choice:
    """One multiple-choice example: a context, its candidate endings and the index of the right one."""

    context: str
    endings: list[str]
    label: int


def _field(rec: dict[str, Any], names: Sequence[str]) -> Any:
    for n in names:
        if n in rec:
            return rec[n]
    return None


def read_choices(path: str | Path) -> list[Choice]:
    """Read a multiple-choice JSONL file: one object per line with

    - the context: ``context`` or ``ctx`` (HellaSwag) or ``query`` / ``question``;
    - the endings: ``endings`` (HellaSwag) or ``choices`` / ``options``, a list of strings;
    - the answer: ``label`` (HellaSwag; an int or a digit string) or ``answer`` / ``gold``.

    An ending is appended to the context as is: give it its leading space (HellaSwag's do not have
    one; ``ctx`` + " " + ending is what the harness scores, so a missing space is added).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such task file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not a UTF-8 JSONL file (byte {e.start} is not UTF-8)") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = loads_json(line, f"{p}:{i}", DataError)
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{i}: expected a JSON object, got {type(rec).__name__}")
        ctx = _field(rec, ("context", "ctx", "query", "question"))
        endings = _field(rec, ("endings", "choices", "options"))
        label = _field(rec, ("label", "answer", "gold"))
        if not isinstance(ctx, str) or not isinstance(endings, list) or not endings or label is None:
            raise DataError(f"{p}:{i}: needs a context (ctx), a list of endings and a label")
        try:
            label = int(label)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
            raise DataError(f"{p}:{i}: label must be an integer index, got {quote(label)}") from None
        if not 0 <= label < len(endings):
            raise DataError(f"{p}:{i}: label {label} is not an index into {len(endings)} endings")
        endings = [str(e) for e in endings]
        if "ctx" in rec and "context" not in rec and ctx and not ctx.endswith(" "):  # HellaSwag
            endings = [e if e.startswith(" ") else " " + e for e in endings]
        out.append(Choice(ctx, endings, label))
    if not out:
        raise DataError(f"{p}: no examples")
    return out


@torch.inference_mode()
def score_endings(model, tokenizer, context: str, endings: Sequence[str], block_size: int | None = None) -> list[float]:
    """Log-likelihood (nats) of each ending given the context, in one right-padded batch.

    Context and ending are tokenized separately and concatenated (the harness's convention), so the
    scored tokens are exactly the ending's; a context too long for the model is cut from the left.
    """
    T = _context_length(model, block_size)
    ctx_ids = tokenizer.encode(context) if context else []
    rows, spans = [], []
    for e in endings:
        cont = tokenizer.encode(e)
        if not cont:
            raise DataError(f"ending {e!r} encodes to no tokens")
        seq = (ctx_ids + cont)[-(T + 1):]
        if len(seq) < 2:  # no context at all: predict the ending from an end-of-text token
            seq = [tokenizer.eos_id or 0] + seq
        n_cont = min(len(cont), len(seq) - 1)
        rows.append(seq)
        spans.append(n_cont)
    L = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):  # right padding: a causal model's scored positions never see it
        x[b, : len(r) - 1] = torch.tensor(r[:-1])
    was_training = model.training
    model.eval()
    try:
        logp = model(x.to(model.device)).logits.float().log_softmax(-1).cpu()
    finally:
        model.train(was_training)
    scores = []
    for b, (r, n) in enumerate(zip(rows, spans)):
        targets = torch.tensor(r[-n:])
        positions = torch.arange(len(r) - 1 - n, len(r) - 1)
        scores.append(logp[b, positions, targets].sum().item())
    return scores


def evaluate_choices(
    model, tokenizer, path: str | Path, limit: int | None = None, block_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of a multiple-choice JSONL task: ``acc`` (summed log-likelihood) and ``acc_norm``
    (log-likelihood per byte of the ending)."""
    if tokenizer is None:
        raise ConfigError("multiple-choice scoring needs the checkpoint's tokenizer, and none was saved with it")
    check_eval_settings(block_size=block_size, limit=limit)
    examples = read_choices(path)[:limit]
    right = right_norm = 0
    predictions = []
    bar = _bar(len(examples), "example", progress)
    for ex in examples:
        s = score_endings(model, tokenizer, ex.context, ex.endings, block_size)
        norm = [v / max(1, len(e.encode("utf-8"))) for v, e in zip(s, ex.endings)]
        pick, pick_norm = int(np.argmax(s)), int(np.argmax(norm))
        right += pick == ex.label
        right_norm += pick_norm == ex.label
        predictions.append({"label": ex.label, "pred": pick, "pred_norm": pick_norm, "scores": s})
        bar.update(1)
    bar.close()
    n = len(examples)
    return {"task": str(path), "examples": n, "acc": right / n, "acc_norm": right_norm / n,
            "predictions": predictions}
