"""Tokenizers: raw bytes, characters, byte-level BPE, and pretrained files from a local directory.

Every tokenizer maps text to a list of integer ids and back through one small interface,
:class:`Tokenizer`. Four kinds:

- ``byte``: the 256 byte values are the ids 0..255; special tokens follow (``<|endoftext|>`` = 256).
  Any input, Unicode or binary, round-trips exactly through :meth:`ByteTokenizer.decode_bytes`.
- ``char``: the sorted set of characters of a corpus (nanoGPT's shakespeare_char: 65 for tiny
  Shakespeare). Text with a character outside the vocabulary is an error, never silently dropped.
- ``bpe``: byte-level BPE (Sennrich et al. 2016, as in GPT-2) trained with the ``tokenizers`` library.
- ``pretrained``: an HF ``tokenizer.json`` or GPT-2 ``vocab.json`` + ``merges.txt`` read from disk.

Special-token strings inside the text are encoded literally (as ordinary bytes/characters) unless
``encode(..., allow_special=True)``, or the text is a :class:`SpecialText` (a conversation rendered with
the model's chat template, whose ``<|im_start|>``... are meant as tokens); special ids enter a stream
explicitly, e.g. ``eos_id`` between documents. ``encode`` never adds BOS/EOS by itself (``add_bos``
says whether the model expects one before a prompt). A pretrained tokenizer may carry the model's
``chat_template`` (Jinja; rendered by :mod:`lmzoo.serving.templates`). See docs/tokenization.md.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmzoo.config import SIZE_LIMITS, read_json
from lmzoo.errors import CheckpointError, ConfigError, DataError, suggest
from lmzoo.formats.atomic import atomic_write_text

EOT = "<|endoftext|>"
CONFIG_NAME = "tokenizer_config.json"
HF_NAME = "tokenizer.json"
FORMAT_VERSION = 1
KINDS = ("byte", "char", "bpe")
DEFAULT_BPE_VOCAB = 4096

# Bytes that are not valid UTF-8 survive inside a str as lone surrogates U+DC80..U+DCFF when decoded
# with errors="surrogateescape" (PEP 383); this is how documents of arbitrary bytes travel as text.
_ESCAPED = re.compile("[\udc80-\udcff]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


def to_bytes(text: str | bytes) -> bytes:
    """UTF-8 bytes of ``text``; surrogate-escaped characters become their original bytes."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    if not isinstance(text, str):
        raise TypeError(f"expected str or bytes, got {type(text).__name__}")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside U+DC80..U+DCFF: keep its bytes as they are
        return text.encode("utf-8", "surrogatepass")


class SpecialText(str):
    """Text whose special-token strings are tokens (a chat template's output): every tokenizer encodes it
    as with ``allow_special=True``. Plain ``str`` text never is, so user text cannot forge a special token."""


def _as_id_list(ids: Any) -> list[int]:
    """A flat list of ints from a list, tuple, numpy array, torch tensor or a single int."""
    if hasattr(ids, "tolist"):  # numpy array/scalar or torch tensor
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):
        raise ValueError("decode takes one sequence of ids (1-D); decode each row of a batch separately")
    return ids


def _split_special(text: str | bytes, specials: dict) -> Iterator[str | bytes | int]:
    """Cut ``text`` around occurrences of special strings: yields text pieces and special ids."""
    if not specials:
        yield text
        return
    keys = sorted(specials, key=len, reverse=True)  # longest first, so no special hides inside another
    pattern = re.compile(
        b"|".join(map(re.escape, keys)) if isinstance(text, bytes) else "|".join(map(re.escape, keys))
    )
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos : m.start()]
        yield specials[m.group()]
        pos = m.end()
    if pos < len(text):
        yield text[pos:]


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set ``kind`` and ``special_tokens`` ({string: id}).

    Contract: ``decode(encode(text)) == text`` for every valid Unicode ``text`` (char: for text made
    of its vocabulary); ids are in ``range(vocab_size)``; ``save(d)`` then ``load_tokenizer(d)``
    gives a tokenizer with identical ``encode``/``decode``.
    """

    kind: str = ""
    special_tokens: dict[str, int]
    eos_token: str = EOT
    bos_token: str | None = None  # the beginning-of-sequence token some pretrained models expect
    add_bos: bool = False  # the model expects bos_token before a prompt (llama.cpp's add_bos_token)
    chat_template: str | None = None  # the model's own Jinja chat template (lmzoo.serving.templates)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-text token (``<|endoftext|>`` unless the files name another), or None."""
        return self.special_tokens.get(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        """Id of ``bos_token``, or None."""
        return self.special_tokens.get(self.bos_token) if self.bos_token else None

    @abstractmethod
    def encode(self, text: str | bytes, allow_special: bool = False) -> list[int]:
        """Ids of ``text``. With ``allow_special`` the special-token strings in it become their ids."""

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, possibly faster."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Any) -> str:
        """Text of ``ids`` (list[int], 1-D tensor or numpy array); an id outside the vocabulary: DataError."""

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer into ``directory`` (created if needed); each file is written atomically.

        ``tokenizer_config.json`` is written last, so a directory that has it holds a whole tokenizer.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._save_files(d)
        config = {
            "lmzoo_tokenizer": FORMAT_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "eos_token": self.eos_token,
            **{k: v for k in ("bos_token", "add_bos", "chat_template") if (v := getattr(self, k))},
            **self._extra_config(),
        }
        atomic_write_text(d / CONFIG_NAME, json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def _save_files(self, directory: Path) -> None:  # noqa: B027 - most kinds need only the config
        """Write files besides tokenizer_config.json (bpe/pretrained: tokenizer.json)."""

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def _checked_ids(self, ids: Any) -> list[int]:
        ids = _as_id_list(ids)
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise DataError(f"token id {i} is outside the {self.kind} tokenizer's vocabulary (size {n})")
        return ids

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
        )


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the bytes of the UTF-8 text; special tokens take 256, 257, ... in order."""

    kind = "byte"

    def __init__(self, special_tokens: Sequence[str] = (EOT,)) -> None:
        self.special_tokens = {s: 256 + i for i, s in enumerate(special_tokens)}
        self._special_bytes = {s.encode("utf-8"): i for s, i in self.special_tokens.items()}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode(self, text: str | bytes, allow_special: bool = False) -> list[int]:
        data = to_bytes(text)
        if not (allow_special or isinstance(text, SpecialText)):
            return list(data)
        ids: list[int] = []
        for part in _split_special(data, self._special_bytes):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(part)
        return ids

    def decode_bytes(self, ids: Any) -> bytes:
        """The exact bytes of ``ids`` (special ids give the UTF-8 bytes of their string)."""
        ids = self._checked_ids(ids)
        if not ids or max(ids) < 256:
            return bytes(ids)
        names = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        return b"".join(names[i] if i >= 256 else bytes((i,)) for i in ids)

    def decode(self, ids: Any, errors: str = "replace") -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 follow ``errors`` (U+FFFD by default)."""
        return self.decode_bytes(ids).decode("utf-8", errors)


class CharTokenizer(Tokenizer):
    """One id per character of a fixed vocabulary (``chars``, in id order); specials follow it."""

    kind = "char"

    def __init__(self, chars: Iterable[str], special_tokens: Sequence[str] = ()) -> None:
        self.chars = list(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise CheckpointError("char vocabulary must be a list of distinct single characters")
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special_tokens)}
        self._itos = self.chars + list(self.special_tokens)

    @classmethod
    def from_texts(cls, texts: Iterable[str], special_tokens: Sequence[str] = ()) -> CharTokenizer:
        """Vocabulary = sorted set of the characters of ``texts`` (nanoGPT's shakespeare_char rule)."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        escaped = sorted(c for c in seen if "\udc80" <= c <= "\udcff")
        if escaped:
            raise DataError(
                f"the corpus is not valid UTF-8 (byte 0x{ord(escaped[0]) - 0xDC00:02x}); the char tokenizer "
                "needs UTF-8 text, byte and bpe take any bytes"
            )
        return cls(sorted(seen), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str | bytes, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            data = bytes(text)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not valid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}); "
                    "the char tokenizer needs UTF-8 text"
                ) from None
        special = allow_special or isinstance(text, SpecialText)
        parts = _split_special(text, self.special_tokens) if special else (text,)
        ids: list[int] = []
        offset = 0
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
                offset += len(self._itos[part])
                continue
            try:
                ids.extend([self._stoi[c] for c in part])
            except KeyError:
                self._raise_unknown(part, offset)
            offset += len(part)
        return ids

    def _raise_unknown(self, text: str, offset: int) -> None:
        pos, c = next((i, c) for i, c in enumerate(text) if c not in self._stoi)
        if "\udc80" <= c <= "\udcff":
            at = len(to_bytes(text[:pos]))
            raise DataError(f"not valid UTF-8 at byte offset {at} (byte 0x{ord(c) - 0xDC00:02x})")
        raise DataError(
            f"character {c!r} (U+{ord(c):04X}) at position {offset + pos} is not in the char vocabulary "
            f"({len(self.chars)} characters)"
        )

    def decode(self, ids: Any) -> str:
        return "".join([self._itos[i] for i in self._checked_ids(ids)])

    def _extra_config(self) -> dict[str, Any]:
        return {"chars": self.chars}


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table used by the ByteLevel pre-tokenizer."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind the lmzoo interface (kinds ``bpe`` and ``pretrained``).

    For byte-level models (ByteLevel decoder, every byte in the vocabulary) any bytes round-trip:
    bytes that are not valid UTF-8 are encoded as their single-byte tokens and
    :meth:`decode_bytes` restores them exactly.
    """

    def __init__(self, tk: Any, kind: str = "bpe", eos_token: str | None = None) -> None:
        from tokenizers import decoders

        self._tk = tk
        self._tk.encode_special_tokens = True  # special strings in text stay text (see module docstring)
        self.kind = kind
        added = sorted(tk.get_added_tokens_decoder().items())
        self.special_tokens = {t.content: i for i, t in added if t.special}
        candidates = [eos_token] if eos_token else [EOT, "</s>", "<|end_of_text|>", "<eos>"]
        self.eos_token = next((t for t in candidates if t in self.special_tokens), candidates[0])
        self._byte_ids: list[int] | None = None
        if isinstance(tk.decoder, decoders.ByteLevel):
            ids = [tk.token_to_id(byte_to_unicode()[b]) for b in range(256)]
            if all(i is not None for i in ids):
                self._byte_ids = ids
                self._unicode_to_byte = {ch: b for b, ch in byte_to_unicode().items()}

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Any:
        """The ``tokenizers.Tokenizer`` underneath."""
        return self._tk

    @property
    def byte_level(self) -> bool:
        """True when arbitrary bytes round-trip through :meth:`decode_bytes`."""
        return self._byte_ids is not None

    def _plain(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def _encode_escaped(self, text: str) -> list[int]:
        """Encode text whose undecodable bytes are surrogate-escaped: valid runs via BPE, bad bytes raw."""
        if self._byte_ids is None:
            m = _ESCAPED.search(text)
            raise DataError(
                f"not valid UTF-8 at byte offset {len(to_bytes(text[: m.start()]))}; this pretrained "
                "tokenizer is not byte-level and needs UTF-8 text"
            )
        ids: list[int] = []
        pos = 0
        for m in _ESCAPED.finditer(text):
            if m.start() > pos:
                ids += self._plain(text[pos : m.start()])
            ids += [self._byte_ids[ord(c) - 0xDC00] for c in m.group()]
            pos = m.end()
        if pos < len(text):
            ids += self._plain(text[pos:])
        return ids

    def _encode_one(self, text: str | bytes) -> list[int]:
        if not isinstance(text, str) or _SURROGATE.search(text):
            text = to_bytes(text).decode("utf-8", "surrogateescape")
        if _ESCAPED.search(text):
            return self._encode_escaped(text)
        return self._plain(text)

    def encode(self, text: str | bytes, allow_special: bool = False) -> list[int]:
        if not (allow_special or isinstance(text, SpecialText)):
            return self._encode_one(text)
        if not isinstance(text, str):
            text = to_bytes(text).decode("utf-8", "surrogateescape")
        ids: list[int] = []
        for part in _split_special(text, self.special_tokens):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self._encode_one(part)
        return ids

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        if all(isinstance(t, str) and not _SURROGATE.search(t) for t in texts):
            fast = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)  # fast: no offsets
            return [e.ids for e in fast(list(texts), add_special_tokens=False)]
        return [self._encode_one(t) for t in texts]

    def decode(self, ids: Any) -> str:
        return self._tk.decode(self._checked_ids(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Any) -> bytes:
        """The exact bytes of ``ids`` (byte-level tokenizers only)."""
        if self._byte_ids is None:
            return self.decode(ids).encode("utf-8")
        ids = self._checked_ids(ids)
        id_to_special = {i: s for s, i in self.special_tokens.items()}
        out = bytearray()
        for i in ids:
            if i in id_to_special:
                out += id_to_special[i].encode("utf-8")
            else:
                out += bytes(self._unicode_to_byte[ch] for ch in self._tk.id_to_token(i))
        return bytes(out)

    def _save_files(self, directory: Path) -> None:
        atomic_write_text(directory / HF_NAME, self._tk.to_str())


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOT,)) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts`` with the ``tokenizers`` library.

    The vocabulary starts from the 256 byte symbols plus ``special_tokens`` (ids 0..n-1, in order)
    and grows by merging the most frequent adjacent pair until it has ``vocab_size`` entries or no
    pair is left, so a small corpus can give fewer. Raises DataError when ``vocab_size`` cannot
    hold the bytes and the special tokens.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise DataError(
            f"vocab_size {vocab_size} is too small for byte-level BPE: it needs at least {minimum} "
            f"(256 bytes + {len(special_tokens)} special tokens)"
        )
    if vocab_size > SIZE_LIMITS["vocab_size"]:  # tokenizers aborts the process (a Rust panic) on 10**12
        raise ConfigError(f"vocab_size must be at most {SIZE_LIMITS['vocab_size']:,}, got {vocab_size:,}")
    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Undecodable bytes cannot cross into Rust as str; for counting pairs U+FFFD stands in for them.
    trainable = (_ESCAPED.sub("\ufffd", to_bytes(t).decode("utf-8", "surrogateescape")) for t in texts)
    tk.train_from_iterator(trainable, trainer=trainer)
    return HFTokenizer(tk, kind="bpe")


def build_tokenizer(
    kind: str,
    text_or_iterable: str | Iterable[str] = (),
    vocab_size: int | None = None,
    special_tokens: Sequence[str] | None = None,
) -> Tokenizer:
    """A new tokenizer of ``kind`` ("byte" | "char" | "bpe") fitted to the text.

    ``special_tokens`` defaults to ``("<|endoftext|>",)`` for byte and bpe and to none for char (so
    tiny Shakespeare gives nanoGPT's 65). ``vocab_size`` is for bpe only (default 4096).
    """
    texts = [text_or_iterable] if isinstance(text_or_iterable, (str, bytes)) else text_or_iterable
    if kind not in KINDS:
        raise ConfigError(
            f"unknown tokenizer kind {kind!r}; choose from {', '.join(KINDS)}{suggest(kind, KINDS)}"
        )
    if kind != "bpe" and vocab_size is not None:
        raise ConfigError(
            f"vocab_size applies to the bpe tokenizer only; the {kind} vocabulary is fixed by its kind"
        )
    if kind == "byte":
        return ByteTokenizer((EOT,) if special_tokens is None else special_tokens)
    if kind == "char":
        return CharTokenizer.from_texts(texts, () if special_tokens is None else special_tokens)
    specials = (EOT,) if special_tokens is None else special_tokens
    return train_bpe(texts, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size, specials)


def _rust_tokenizer_from_file(path: Path) -> Any:
    from tokenizers import Tokenizer as RustTokenizer

    try:
        return RustTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with a serde message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a tokenizers file ({msg})") from None


def _read_json(path: Path) -> Any:
    return read_json(path, CheckpointError, mapping=False)  # size- and depth-bounded: the file may be anyone's


def _hf_eos_token(directory: Path) -> str | None:
    """The ``eos_token`` named by a transformers-style tokenizer_config.json, if any."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        value = read_json(path, CheckpointError).get("eos_token")
    except CheckpointError:
        return None
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def read_hf_template(directory: Path, tok: Tokenizer) -> Tokenizer:
    """Set ``tok``'s chat template, BOS token and ``add_bos`` from a transformers tokenizer directory:
    ``chat_template.jinja`` (transformers >= 4.43) or ``chat_template`` in tokenizer_config.json (a
    string, or a list of named templates: the one named ``default``)."""
    config: Any = {}
    if (directory / CONFIG_NAME).is_file():
        try:
            config = _read_json(directory / CONFIG_NAME)
        except CheckpointError:
            config = {}
    config = config if isinstance(config, dict) else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template.strip():
        tok.chat_template = template
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if isinstance(bos, str) and bos in tok.special_tokens:
        tok.bos_token = bos
        tok.add_bos = config.get("add_bos_token") is True
    return tok


def _gpt2_files(vocab: Path, merges: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    table = _read_json(vocab)
    if not isinstance(table, dict):
        raise CheckpointError(f"{vocab} is not a GPT-2 vocab.json (expected a token -> id object)")
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise CheckpointError(
            f"{vocab.parent}: not GPT-2 vocab.json + merges.txt ({str(e).splitlines()[0]})"
        ) from None
    tk = RustTokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if EOT in table:
        tk.add_special_tokens([EOT])  # GPT-2 keeps <|endoftext|> (50256) in vocab.json; mark it special
    return HFTokenizer(tk, kind="pretrained", eos_token=_hf_eos_token(vocab.parent))


def _has_tokenizer(d: Path) -> bool:
    return any((d / n).is_file() for n in (CONFIG_NAME, HF_NAME, "vocab.json"))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory (or a ``tokenizer.json`` file).

    Recognised, in order: an lmzoo-saved directory (``tokenizer_config.json`` with
    ``"lmzoo_tokenizer"``), an HF ``tokenizer.json``, GPT-2 ``vocab.json`` + ``merges.txt``. A
    directory holding none of them but a ``tokenizer/`` subdirectory that does (a prepared data set or
    a checkpoint) is read from there. Anything else raises a one-line CheckpointError.
    """
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"no such tokenizer directory: {path}")
    if path.is_file():
        if path.name == CONFIG_NAME:
            path = path.parent
        else:
            return HFTokenizer(_rust_tokenizer_from_file(path), kind="pretrained")
    if not _has_tokenizer(path) and _has_tokenizer(path / "tokenizer"):
        path = path / "tokenizer"
    config_path = path / CONFIG_NAME
    config = _read_json(config_path) if config_path.is_file() else None
    if isinstance(config, dict) and "lmzoo_tokenizer" in config:
        return _from_lmzoo_config(path, config)
    if (path / HF_NAME).is_file():
        tok = HFTokenizer(_rust_tokenizer_from_file(path / HF_NAME), "pretrained", _hf_eos_token(path))
        return read_hf_template(path, tok)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return read_hf_template(path, _gpt2_files(path / "vocab.json", path / "merges.txt"))
    raise CheckpointError(
        f"no tokenizer in {path}: expected {CONFIG_NAME} (lmzoo), {HF_NAME} (Hugging Face), "
        "or vocab.json + merges.txt (GPT-2)"
    )


def _from_lmzoo_config(path: Path, config: dict[str, Any]) -> Tokenizer:
    version = config.get("lmzoo_tokenizer")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: tokenizer format {version!r} is not one this lmzoo reads "
            f"(1..{FORMAT_VERSION})"
        )
    kind = config.get("kind")
    raw_specials, eos = config.get("special_tokens") or {}, config.get("eos_token")
    if not isinstance(raw_specials, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in raw_specials.items()
    ):
        raise CheckpointError(f"{path / CONFIG_NAME}: 'special_tokens' must map token strings to integer ids")
    if eos is not None and not isinstance(eos, str):
        raise CheckpointError(f"{path / CONFIG_NAME}: 'eos_token' must be a string or null, got {eos!r}")
    specials = sorted(raw_specials.items(), key=lambda kv: kv[1])
    names = [s for s, _ in specials]
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer(names)
    elif kind == "char":
        if not isinstance(config.get("chars"), list) or not all(isinstance(c, str) for c in config["chars"]):
            raise CheckpointError(f"{path / CONFIG_NAME}: a char tokenizer needs its 'chars' list of characters")
        tok = CharTokenizer(config["chars"], names)
    elif kind in ("bpe", "pretrained"):
        if not (path / HF_NAME).is_file():
            raise CheckpointError(f"{path}: {HF_NAME} is missing for the {kind} tokenizer")
        tok = HFTokenizer(_rust_tokenizer_from_file(path / HF_NAME), kind, config.get("eos_token"))
    else:
        known = (*KINDS, "pretrained")
        raise CheckpointError(
            f"{path / CONFIG_NAME}: unknown tokenizer kind {kind!r}{suggest(str(kind), known)}"
        )
    if tok.special_tokens != dict(specials):
        raise CheckpointError(f"{path}: special tokens {dict(specials)} do not match the vocabulary")
    if kind in ("byte", "char") and config.get("eos_token"):
        tok.eos_token = config["eos_token"]
    for key, kind_ok in (("bos_token", str), ("add_bos", bool), ("chat_template", str)):
        value = config.get(key)
        if value is not None and not isinstance(value, kind_ok):
            raise CheckpointError(f"{path / CONFIG_NAME}: {key!r} must be a {kind_ok.__name__}, got {value!r}")
        if value is not None:
            setattr(tok, key, value)
    return tok
