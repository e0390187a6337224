"""The tokenizer a GGUF file describes in its metadata, rebuilt as a Hugging Face ``tokenizers`` tokenizer,
and an lmzoo tokenizer written back as metadata.

A GGUF file carries no ``tokenizer.json``; llama.cpp keeps the pieces under ``tokenizer.ggml.*``:

| key                         | what                                                                   |
|-----------------------------|------------------------------------------------------------------------|
| ``model``                   | the algorithm: ``gpt2`` = byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen) |
| ``pre``                     | the pre-tokenizer: how text is split before BPE (a regex per model)     |
| ``tokens``                  | the vocabulary, id order, in the byte-level alphabet (``Ġthe``)        |
| ``token_type``              | per token: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte |
| ``merges``                  | BPE merges, ``"a b"``, best first                                       |
| ``bos/eos/..._token_id``    | the special tokens' ids; ``add_bos_token``: prepend BOS to a prompt     |
| ``tokenizer.chat_template`` | the model's Jinja chat template                                        |

Rebuilt: a ``BPE(vocab, merges)`` model, the pre-tokenizer of ``pre`` (llama.cpp's regexes, table
below), a ByteLevel decoder, control tokens as special added tokens and user-defined ones as plain
added tokens (llama.cpp matches both whole). ``tests/test_gguf.py`` checks the ids against
``transformers``' tokenizer from the same file. Only ``gpt2`` (byte-level BPE) vocabularies are
rebuilt; SentencePiece (``llama``: Llama 2, Mistral v0.1), WordPiece and the others are refused
by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.gguf.reader import GGUFFile
from lmzoo.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, byte_to_unicode

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by the `pre` names that select them
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# digits one by one, then GPT-2's split (StarCoder and the models trained with its tokenizer settings)
DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
GPT2_LIKE = ("default", "gpt-2", "gpt2", "jina-v1-en", "olmo", "mpt")
SPLITS = {**{p: LLAMA3_SPLIT for p in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx")},
          **{p: QWEN2_SPLIT for p in ("qwen2", "deepseek-r1-qwen")}}
IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe")  # llama.cpp looks whole words up before merging


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre is not None and pre not in GPT2_LIKE:
        warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} is not in lmzoo's table: GPT-2's split is used, and "
                      "text may tokenize otherwise than in llama.cpp", stacklevel=3)
    return byte_level


def _strings(f: GGUFFile, key: str) -> list[str]:
    v = f.get(key)
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise CheckpointError(f"{f.path}: metadata {key} must be an array of strings")
    return v


def _token_id(f: GGUFFile, key: str, n: int) -> int | None:
    v = f.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
        raise CheckpointError(f"{f.path}: metadata {key}={v!r} is not a token id of the {n:,}-token vocabulary")
    return v


def tokenizer_from_gguf(f: GGUFFile) -> HFTokenizer:
    """The lmzoo tokenizer (an :class:`~lmzoo.tokenizer.HFTokenizer`) the file's metadata describes, with
    its BOS/EOS, ``add_bos`` and chat template. CheckpointError naming what it cannot rebuild."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as RustTokenizer

    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError(f"{f.path}: the file holds no tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise CheckpointError(f"{f.path}: GGUF tokenizer model {kind!r} is not rebuilt by lmzoo (it reads gpt2: "
                              "byte-level BPE)")
    tokens = _strings(f, "tokenizer.ggml.tokens")
    merges = _strings(f, "tokenizer.ggml.merges") if f.get("tokenizer.ggml.merges") is not None else []
    types = f.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in np.asarray(types).ravel()]
    if len(types) != len(tokens):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.token_type has {len(types):,} entries for "
                              f"{len(tokens):,} tokens")
    # Tokens are spelled in the byte-level alphabet; a user-defined token written as raw text (some
    # converters do) is respelled through its UTF-8 bytes, as transformers does.
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{f.path}: tokenizer.ggml.merges entry {m[:40]!r} is not two tokens")
        pairs.append((parts[0], parts[1]))
    pre = f.get("tokenizer.ggml.pre")
    try:
        model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                           ignore_merges=pre in IGNORE_MERGES)
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise CheckpointError(f"{f.path}: the GGUF vocabulary and merges do not form a BPE model "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    tk = RustTokenizer(model)
    tk.pre_tokenizer = _pre_tokenizer(pre if isinstance(pre, str) else None)
    tk.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>...) are special; one spelled outside the byte alphabet is a mislabel
    # of llama.cpp's converters and would grow the vocabulary past the model's, so it is left out
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                           if k == CONTROL and set(t) <= alphabet])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                   if k == USER_DEFINED and t in vocab])
    n = len(tokens)
    eos = _token_id(f, "tokenizer.ggml.eos_token_id", n)
    bos = _token_id(f, "tokenizer.ggml.bos_token_id", n)
    tok = HFTokenizer(tk, kind="pretrained", eos_token=tokens[eos] if eos is not None else None)
    if bos is not None and tokens[bos] in tok.special_tokens:
        tok.bos_token = tokens[bos]
        tok.add_bos = f.get("tokenizer.ggml.add_bos_token") is True
    template = f.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        tok.chat_template = template
    return tok


def tokenizer_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.*`` metadata of an lmzoo tokenizer, for a model of ``vocab_size`` rows.

    A byte-level BPE (``bpe``/``pretrained`` kinds) is written as llama.cpp's ``gpt2`` model; lmzoo's
    ``byte`` tokenizer too: its 256 bytes are a byte-level vocabulary without merges. The model's rows past
    the tokenizer's vocabulary get unused ``[PAD{i}]`` tokens (llama.cpp wants one token per row). A
    ``char`` tokenizer has no GGUF form: ConfigError.
    """
    import json

    if isinstance(tok, ByteTokenizer):
        spelling = byte_to_unicode()
        tokens = [spelling[b] for b in range(256)] + list(tok.special_tokens)
        types = [NORMAL] * 256 + [CONTROL] * len(tok.special_tokens)
        merges: list[str] = []
        pre = "default"
    elif isinstance(tok, HFTokenizer):
        spec = json.loads(tok.backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ConfigError(f"cannot write the tokenizer as GGUF: a {model.get('type')} model with a "
                              f"{(spec.get('decoder') or {}).get('type')} decoder (GGUF export writes byte-level BPE)")
        by_id = {i: t for t, i in model["vocab"].items()}
        for added in spec.get("added_tokens") or []:
            by_id[added["id"]] = added["content"]
        n = max(by_id) + 1 if by_id else 0
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
        specials = set(tok.special_tokens.values())
        added_ids = {a["id"] for a in spec.get("added_tokens") or []}
        types = [CONTROL if i in specials else USER_DEFINED if i in added_ids else
                 NORMAL if i in by_id else UNUSED for i in range(n)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        pre = _pre_name(spec.get("pre_tokenizer"))
    else:
        raise ConfigError(f"cannot write a {tok.kind} tokenizer as GGUF (llama.cpp has no such vocabulary; "
                          "byte-level BPE and lmzoo's byte tokenizer are written)")
    if len(tokens) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokens):,} tokens, more than the model's {vocab_size:,} rows")
    types += [UNUSED] * (vocab_size - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tok.add_bos),
    }
    for key, token_id in (("eos", tok.eos_id), ("bos", tok.bos_id)):
        if token_id is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = token_id
    if tok.chat_template:
        out["tokenizer.chat_template"] = tok.chat_template
    return out


def _pre_name(pre: Any) -> str:
    """The llama.cpp ``pre`` name of a tokenizers pre-tokenizer spec (GPT-2's split: ``default``)."""
    items: Sequence[Any] = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" \
        else [pre]
    kinds = [p.get("type") for p in items if isinstance(p, dict)]
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "default"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (items[0].get("pattern") or {}).get("Regex")
        for name, split in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
            if pattern == split:
                return name
    raise ConfigError(f"cannot write the tokenizer as GGUF: its pre-tokenizer {kinds} has no llama.cpp name")
