"""Text in, text out: a model (or a model's name) and a string give a string, with no token ids in sight.

    lmzoo.complete("smollm2-135m-instruct", "The capital of France is", max_new_tokens=8)
    lmzoo.complete("smollm2-135m-instruct", [{"role": "user", "content": "Name a color."}])
    for piece in lmzoo.stream_complete(model, "Once upon a time", tokenizer=tok):
        print(piece, end="", flush=True)

A string prompt is continued; a list of messages is rendered with the model's own chat template
(:mod:`lmzoo.serving.templates`; lmzoo's transcript for models without one) and answered. The text
stops at the model's end token, at a ``stop`` string (not included) or after ``max_new_tokens``.
Decoding is greedy unless ``temperature`` > 0 (then ``top_k``, ``top_p``, ``seed`` apply).

A name or path is loaded with :func:`lmzoo.formats.load.load_any` and kept for the next call (one
model at a time); a model object takes its tokenizer from ``tokenizer=`` or from the ``load_any`` call
that returned it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from lmzoo.errors import ConfigError
from lmzoo.formats.load import load_any, tokenizer_of
from lmzoo.serving.chat import stream_text
from lmzoo.serving.templates import render_chat
from lmzoo.tokenizer import Tokenizer

_LOADED: dict[tuple[str, str, str], tuple[Any, Tokenizer | None]] = {}  # the last model loaded by name


def _model_and_tokenizer(model: Any, tokenizer: Tokenizer | None, device: str, dtype: Any) -> tuple[Any, Tokenizer]:
    if isinstance(model, (str, os.PathLike)):
        key = (str(model), str(device), str(dtype))
        if key not in _LOADED:
            _LOADED.clear()  # one model at a time: a second name releases the first
            _LOADED[key] = load_any(model, device=device, dtype=dtype)
        model, loaded_tok = _LOADED[key]
        tokenizer = tokenizer or loaded_tok
    tokenizer = tokenizer or tokenizer_of(model)
    if tokenizer is None:
        raise ConfigError("no tokenizer for this model: pass tokenizer=, or load the model with lmzoo.load_any "
                          "(or by name) so that its tokenizer comes with it")
    return model, tokenizer


def stream_complete(
    model: Any,
    prompt: str | Sequence[dict[str, str]],
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    template: str = "auto",
    device: str = "cpu",
    dtype: Any = None,
) -> Iterator[str]:
    """The continuation of ``prompt`` (a string) or the answer to it (a list of ``{"role", "content"}``
    messages), as text pieces while they are generated. ``model``: an lmzoo model, a checkpoint/HF
    directory, a GGUF file or a registered name (``lmzoo info --list``); ``device``/``dtype`` apply to
    loading one. Settings are checked before the first piece (one-line ConfigError)."""
    from lmzoo.decoding.generate import check_sampling

    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if isinstance(stop, str):
        stop = [stop]
    model, tok = _model_and_tokenizer(model, tokenizer, device, dtype)
    if isinstance(prompt, str):
        text, stops = prompt, list(stop)
    elif isinstance(prompt, Sequence):
        text, template_stops = render_chat(prompt, tok, template)
        stops = [*template_stops, *stop]
    else:
        raise ConfigError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    return stream_text(model, tok, text, max_new_tokens, stops, **sampling)


def complete(model: Any, prompt: str | Sequence[dict[str, str]], **kwargs: Any) -> str:
    """:func:`stream_complete` joined into one string (same arguments)."""
    return "".join(stream_complete(model, prompt, **kwargs))
