"""Turn a corpus into token files: ``train.bin``, ``val.bin``, ``tokenizer/`` and ``meta.json``.

The pipeline streams: documents are read in order, grouped into chunks of about a million
characters, tokenized (in worker processes for inputs over a few MB) and appended to the two
binary files, so memory holds a few chunks whatever the corpus size (tokenizers are handed parts
of at most about 64K characters where cutting there is exact, see :func:`split_text`: a byte-level
BPE holds a few hundred bytes per token of the text it is given). Everything is written under
a hidden temporary directory in ``out_dir`` and moved into place at the end, ``meta.json`` last:
a directory with ``meta.json`` always holds a complete data set. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmzoo.common import smoke_mode
from lmzoo.config import SIZE_LIMITS, check_parallelism, read_json
from lmzoo.data.sources import BUILTINS, SAFE_CUT, Source, open_source
from lmzoo.errors import ConfigError, DataError, quote, suggest
from lmzoo.formats.atomic import atomic_write_text, fsync_dir
from lmzoo.tokenizer import EOT, KINDS, Tokenizer, build_tokenizer, load_tokenizer, to_bytes

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FORMAT_VERSION = 1
META_NAME = "meta.json"
SPLITS = ("train", "val")
PARALLEL_BYTES = 4 << 20  # inputs larger than this are tokenized by worker processes
CHUNK_CHARS = 1 << 20  # characters per unit of work sent to a worker
PART_CHARS = 1 << 16  # a tokenizer sees texts of about this size (where a cut is exact): bounded memory
BATCH_CHARS = 1 << 18  # characters per encode_batch call
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: i -> i * _GOLDEN mod 2**64 is a bijection

Item = tuple[str, bool, bool]  # (text, goes to val, append eos after it)


def is_val_document(index: int, val_fraction: float) -> bool:
    """The split rule for multi-document sources: is document ``index`` (0-based) in val?

    Document i goes to val when frac((i + 1) / golden ratio) < val_fraction, computed exactly in
    64-bit integers. It depends only on the index, so it is deterministic and needs no pass
    over the data; the golden-ratio sequence is evenly spread, so any run of N consecutive documents
    holds val_fraction * N of them in val, give or take about one.
    """
    return ((index + 1) * _GOLDEN) % 2**64 < int(val_fraction * 2**64)


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _items(source: Source, val_fraction: float, total_chars: int | None) -> Iterator[Item]:
    """The corpus as (text, is_val, eos_after) in order; the train/val rule is applied here."""
    if not source.single_text:
        for i, doc in enumerate(source.texts()):
            if doc:
                yield doc, is_val_document(i, val_fraction), True
        return
    # One text: the first (1 - val_fraction) of its characters is train, the rest val (nanoGPT).
    assert total_chars is not None
    cut = int(total_chars * (1 - val_fraction))
    pos = 0
    for piece in source.texts():
        if pos + len(piece) <= cut:
            yield piece, False, False
        elif pos >= cut:
            yield piece, True, False
        else:
            yield piece[: cut - pos], False, False
            yield piece[cut - pos :], True, False
        pos += len(piece)


def _chunks(items: Iterable[Item], chunk_chars: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += len(item[0])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def split_text(text: str, size: int | None = None) -> Iterator[str]:
    """``text`` in consecutive parts of at least ``size`` characters (the last one shorter), cut only
    just after a newline that has a non-space character on both sides; without such a newline the rest
    stays whole.

    Tokenizing the parts one by one gives exactly the ids of the whole text for the byte and char
    tokenizers (any cut) and for lmzoo's byte-level BPE: its GPT-2 pre-tokenizer never joins a newline
    to what follows a non-space character, nor to a non-space character before it, so the pre-tokens
    (and the merges inside them) are the same. Training on the parts counts the same pre-tokens.
    """
    size = size or PART_CHARS  # read at call time: tests shrink it
    start = 0
    while len(text) - start > size:
        m = SAFE_CUT.search(text, start + size)
        if m is None:
            break
        yield text[start : m.start()]
        start = m.start()
    yield text[start:]


def _split_texts(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from split_text(text)


def _encode_chunk(tok: Tokenizer, items: list[Item], dtype: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(train ids, val ids, train documents, val documents) of one chunk, eos appended where asked.

    Long texts are encoded in parts (:func:`split_text`, exact for lmzoo's own kinds; a pretrained
    tokenizer gets each text whole), at most about BATCH_CHARS characters per ``encode_batch`` call,
    each result turned into a compact array at once: the tokenizer's per-token objects never pile up.
    """
    eos = tok.eos_id
    exact = tok.kind in KINDS
    ids_of: list[list[np.ndarray]] = [[] for _ in items]
    batch: list[tuple[int, str]] = []
    size = 0

    def flush() -> None:
        for (k, _), ids in zip(batch, tok.encode_batch([text for _, text in batch])):
            ids_of[k].append(np.asarray(ids, dtype=dtype))
        batch.clear()

    for k, (text, _, _) in enumerate(items):
        for part in split_text(text) if exact else (text,):
            batch.append((k, part))
            size += len(part)
            if size >= BATCH_CHARS:
                flush()
                size = 0
    flush()
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    docs = [0, 0]
    for (_, is_val, eos_after), arrays in zip(items, ids_of):
        if eos_after and eos is not None:
            arrays.append(np.asarray([eos], dtype=dtype))
        parts[is_val].append(np.concatenate(arrays) if arrays else np.empty(0, dtype))
        docs[is_val] += eos_after
    train, val = (np.concatenate(p) if p else np.empty(0, dtype) for p in parts)
    return train, val, docs[0], docs[1]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_in_worker(items: list[Item], dtype: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    assert _worker_tokenizer is not None
    return _encode_chunk(_worker_tokenizer, items, dtype)


def _hashing(items: Iterable[Item], sha: Any, counts: list[int]) -> Iterator[Item]:
    """Pass items through, feeding their bytes to ``sha`` and counting bytes in ``counts[0]``."""
    for item in items:
        data = to_bytes(item[0])
        sha.update(data)
        counts[0] += len(data)
        yield item


def _tokenize_to_files(
    tok: Tokenizer,
    tok_dir: Path,
    chunks: Iterable[list[Item]],
    files: tuple[BinaryIO, BinaryIO],
    workers: int,
    dtype: Any,
    progress: bool,
) -> tuple[list[int], list[int]]:
    """Tokenize ``chunks`` in order into ``files``; returns ([train, val] tokens, [train, val] documents)."""
    from tqdm.auto import tqdm

    tokens, docs = [0, 0], [0, 0]
    bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress, mininterval=0.5)

    def write(result: tuple[np.ndarray, np.ndarray, int, int]) -> None:
        for k in (0, 1):
            result[k].tofile(files[k])
            tokens[k] += len(result[k])
            docs[k] += result[2 + k]
        bar.update(len(result[0]) + len(result[1]))

    try:
        if workers <= 1:
            for chunk in chunks:
                write(_encode_chunk(tok, chunk, dtype))
        else:
            # apply_async with a bounded window, not Pool.imap: imap would read the whole corpus
            # into its task queue ahead of the workers.
            ctx = multiprocessing.get_context()
            with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok_dir),)) as pool:
                pending: deque = deque()
                for chunk in chunks:
                    pending.append(pool.apply_async(_encode_in_worker, (chunk, dtype)))
                    if len(pending) >= 2 * workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
    finally:
        bar.close()
    return tokens, docs


def _resolve_tokenizer(tokenizer: str | os.PathLike | Tokenizer) -> Tokenizer | str:
    """A ready Tokenizer (instance or directory), or the kind to build from the corpus."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    name = os.fspath(tokenizer)
    if name in KINDS:
        return name
    if Path(name).exists():
        return load_tokenizer(name)
    raise ConfigError(
        f"unknown tokenizer {name!r}: use one of {', '.join(KINDS)} or a tokenizer directory"
        f"{suggest(name, KINDS)}"
    )


def _publish(tmp: Path, out: Path, meta: dict[str, Any]) -> None:
    """Move the finished files from ``tmp`` into ``out``; meta.json is written last."""
    (out / META_NAME).unlink(missing_ok=True)  # an old data set here stops looking complete first
    for name in ("train.bin", "val.bin"):
        os.replace(tmp / name, out / name)
    if (out / "tokenizer").is_dir():
        os.replace(out / "tokenizer", tmp / "old-tokenizer")
    os.replace(tmp / "tokenizer", out / "tokenizer")
    fsync_dir(out)
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


# built-in corpora read from a local copy (``input``) instead of being downloaded
INPUT_SOURCES = ("shakespeare",)
SMOKE_DOCUMENTS = 30  # LMZOO_SMOKE=1: a multi-document built-in corpus is cut to its first documents


def resolve_source(source: str | os.PathLike | None, input: str | os.PathLike | None = None) -> str:
    """The source to prepare: ``source``, or ``input`` alone (a file of one's own); ConfigError when neither is
    named, or when ``input`` comes with a source that reads no local copy (it would be ignored)."""
    if source is None:
        if input is None:
            raise ConfigError("name a corpus to prepare: stdlib, shakespeare, a file or folder, or owner/name")
        return os.fspath(input)
    name = os.fspath(source)
    if input is not None and name not in INPUT_SOURCES and name != os.fspath(input):
        raise ConfigError(
            f"input is the local copy of a built-in corpus ({', '.join(INPUT_SOURCES)}); the source {name!r} "
            f"would ignore it (to prepare {os.fspath(input)!r}, name it as the source)"
        )
    return name


def source_name(source: str | os.PathLike) -> str:
    """What ``meta.json`` records as the source asked for: an existing path made absolute, else the name."""
    name = os.fspath(source)
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


TEMP_PREFIX, LOCK_NAME = ".prepare-", ".prepare.lock"


def _claim(out: Path) -> int:
    """Lock ``out`` for one prepare and remove what a killed earlier one left (its ``.prepare-*`` temporary
    directory, as large as the token files); returns the lock's file descriptor, to close when done.

    The lock is an ``fcntl.lockf`` record lock on ``out/.prepare.lock``: the kernel drops it when its process
    ends, SIGKILL included, and the forked tokenizer workers do not inherit it, so a temporary found while
    holding it belongs to no running prepare. A second prepare into the same directory is refused."""
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:  # elsewhere than POSIX: no lock, and no cleanup (it could not tell stale from busy)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataError(f"{out}: another prepare is writing into this directory; wait for it to end") from None
        for stale in out.glob(TEMP_PREFIX + "*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
    return fd


def prepare(
    source: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
    input: str | os.PathLike | None = None,
    workers: int | None = None,
    split: str = "train",
    limit: int | None = None,
    progress: bool = True,
) -> Path:
    """Tokenize ``source`` into ``out_dir`` and return ``out_dir``.

    ``source``: any form :func:`lmzoo.data.sources.open_source` takes (file, folder, glob, JSONL,
    Parquet, saved or hub data set, ``stdlib``, ``shakespeare``); None with ``input``: that file.
    ``tokenizer``: "byte" | "char" |
    "bpe" (built from this corpus; ``vocab_size`` for bpe), a saved tokenizer directory, or a
    Tokenizer. ``text_field``: the record field holding text. ``input``: local copy for
    ``shakespeare``. ``workers``: tokenizer processes (default: up to 8 for inputs over 4 MB, else
    in-process). ``split``: split of a Hugging Face data set. ``limit``: keep only the first
    ``limit`` documents.

    Writes ``train.bin`` and ``val.bin`` (flat arrays of ids, dtype from ``meta.json``; for a
    multi-document source each document is followed by the tokenizer's eos id, when it has one),
    ``tokenizer/`` and ``meta.json``. A single text is split contiguously (last ``val_fraction`` of
    its characters is val); documents are split by :func:`is_val_document`. Raises DataError or
    ConfigError with a one-line message; on any failure ``out_dir`` gains no ``meta.json``.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    check_parallelism("workers", workers)
    source = resolve_source(source, input)
    if input is not None and source == os.fspath(input):
        input = None  # the file itself is the source
    if limit is None and smoke_mode() and source in BUILTINS:
        limit = SMOKE_DOCUMENTS
    resolved = _resolve_tokenizer(tokenizer)
    strict = resolved == "char" or getattr(resolved, "kind", None) == "char"
    src = open_source(
        source, text_field=text_field, input=input, split=split, strict_utf8=strict, limit=limit
    )
    if isinstance(resolved, str):
        specials = () if resolved == "char" and src.single_text else (EOT,)
        tok = build_tokenizer(resolved, _split_texts(src.texts()), vocab_size=vocab_size, special_tokens=specials)
    elif vocab_size is not None and vocab_size != resolved.vocab_size:
        raise ConfigError(f"vocab_size {vocab_size} given, but the tokenizer has {resolved.vocab_size}")
    else:
        tok = resolved
    dtype = token_dtype(tok.vocab_size)
    if workers is None:
        large = src.size_bytes is None or src.size_bytes > PARALLEL_BYTES
        workers = min(8, os.cpu_count() or 1) if large else 1

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = _claim(out)  # one prepare at a time per directory; a killed one's temporaries removed
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out))  # hidden: folder sources skip it
    try:
        tok.save(tmp / "tokenizer")
        total_chars = sum(len(t) for t in src.texts()) if src.single_text else None
        sha, nbytes = hashlib.sha256(), [0]
        chunks = _chunks(_hashing(_items(src, val_fraction, total_chars), sha, nbytes), CHUNK_CHARS)
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            tokens, docs = _tokenize_to_files(
                tok, tmp / "tokenizer", chunks, (ftrain, fval), workers, dtype, progress
            )
            for f in (ftrain, fval):
                f.flush()
                os.fsync(f.fileno())
        if nbytes[0] == 0:
            raise DataError(f"{src.description}: no text (every document is empty)")
        if tokens[0] == 0:
            raise DataError(f"{src.description}: the train split is empty")
        if val_fraction > 0 and tokens[1] == 0:
            raise DataError(
                f"{src.description}: the val split is empty ({docs[0]} documents are too few for "
                f"val_fraction={val_fraction}); add documents, raise val_fraction, or pass a single file"
            )
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": np.dtype(dtype).name,
            "train_tokens": tokens[0],
            "val_tokens": tokens[1],
            "source": src.description,
            "source_name": source_name(source),
            "source_sha256": sha.hexdigest(),
            "source_bytes": nbytes[0],
            "documents": 1 if src.single_text else docs[0] + docs[1],
            "val_documents": 0 if src.single_text else docs[1],
            "val_fraction": val_fraction,
            "split_rule": "contiguous" if src.single_text else "document-golden-ratio",
            "tokenizer_dir": "tokenizer",
        }
        _publish(tmp, out, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)  # releases the lock
    return out


TOKEN_DTYPES = ("uint16", "uint32")  # what token_dtype gives


def check_meta(meta: dict[str, Any], path: str | os.PathLike) -> None:
    """DataError naming the field of a ``meta.json`` that is missing, of the wrong type or out of range.

    The file may have been edited or come from elsewhere: ``"format_version": "1"``, an unknown dtype, or
    ``"dtype": "int8"`` (which would read every id as a different one and train on them silently) are
    refused, as is a dtype other than the one :func:`token_dtype` gives for the vocabulary."""
    missing = [k for k in ("format_version", "dtype", "vocab_size", "train_tokens", "val_tokens") if k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; prepare the data again")
    for k in ("format_version", "vocab_size", "train_tokens", "val_tokens"):
        v = meta[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 2**62:
            raise DataError(f"{path}: {k} must be a non-negative integer, got {quote(v)}; prepare the data again")
    if not 1 <= meta["format_version"] <= FORMAT_VERSION:
        newer = " (newer than this lmzoo reads)" if meta["format_version"] > FORMAT_VERSION else ""
        raise DataError(f"{path}: unknown data format {meta['format_version']}{newer}; this lmzoo reads "
                        f"1..{FORMAT_VERSION}")
    vocab = meta["vocab_size"]
    if not 1 <= vocab <= SIZE_LIMITS["vocab_size"]:
        raise DataError(f"{path}: vocab_size must be in 1..{SIZE_LIMITS['vocab_size']:,}, got {vocab:,}")
    dtype, want = meta["dtype"], np.dtype(token_dtype(vocab)).name
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{path}: dtype {quote(dtype)} is not a token dtype lmzoo writes ({', '.join(TOKEN_DTYPES)})")
    if dtype != want:
        raise DataError(f"{path}: dtype {dtype} does not match a vocabulary of {vocab:,} (ids are stored as {want})")
    eos = meta.get("eos_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < vocab):
        raise DataError(f"{path}: eos_id must be null or an id below vocab_size {vocab:,}, got {quote(eos)}")


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a prepared data set, after checking the token files match it.

    Raises DataError when ``data_dir`` is missing, not prepared (no meta.json), its meta.json is malformed
    (:func:`check_meta`) or written by a newer format, or its ``.bin`` files are truncated.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"no such data directory: {d}")
    path = d / META_NAME
    if not path.is_file():
        raise DataError(
            f"{d} is not a prepared data set (no {META_NAME}); make one with `lmzoo prepare SOURCE {d}`"
        )
    meta = read_json(path, DataError, max_bytes=1 << 20)
    check_meta(meta, path)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        f = d / f"{split}.bin"
        want = meta[f"{split}_tokens"] * itemsize
        have = f.stat().st_size if f.is_file() else None
        if have != want:
            raise DataError(
                f"{f}: {'missing' if have is None else f'{have} bytes'} where meta.json says {want} bytes; "
                "prepare the data again"
            )
    return meta
