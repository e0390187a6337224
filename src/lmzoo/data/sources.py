"""Where text comes from: files, folders, JSONL/Parquet records, Hugging Face data sets, built-ins.

:func:`open_source` turns a source string into a :class:`Source`, whose :meth:`Source.texts`
yields strings in a deterministic order, afresh on every call:

- a text file: one document, yielded as consecutive pieces of a few MB (concatenated they are the file);
- a folder or a glob pattern: every text/JSONL/Parquet file under it, sorted by relative path,
  hidden files skipped; a text file is one document, a JSONL line or Parquet row is one document;
- ``*.jsonl`` / ``*.parquet``: one document per record, read from ``text_field``;
- a folder written by ``datasets.Dataset.save_to_disk``: one document per row;
- ``hf:NAME`` or ``owner/name`` (not an existing path): a hub data set, streamed (needs network);
- ``stdlib``: the UTF-8 ``.py`` files of this Python's standard library (no site-packages);
- ``shakespeare``: tiny Shakespeare, downloaded once into the cache, or read from ``input=PATH``.

Bytes that are not UTF-8 travel inside the strings as surrogate escapes (PEP 383) so byte-level
tokenizers see them exactly; with ``strict_utf8=True`` (the char tokenizer) they are a DataError
naming the file and the byte offset.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from lmzoo.errors import DataError, suggest
from lmzoo.formats.atomic import atomic_write_bytes

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
BUILTINS = ("stdlib", "shakespeare")
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .html .xml .csv .tsv "
    ".toml .yaml .yml .ini .cfg".split()
)
RECORD_SUFFIXES = frozenset({".jsonl", ".ndjson", ".parquet"})
PIECE_BYTES = 4 << 20  # a single text file is read and tokenized in pieces of about this size


@dataclass(frozen=True)
class Source:
    """A corpus opened by :func:`open_source`.

    ``texts()`` yields the documents (or, when ``single_text``, consecutive pieces of the one text).
    ``size_bytes`` estimates the input size (None when unknown, e.g. streamed from the hub).
    """

    description: str
    single_text: bool
    size_bytes: int | None
    _texts: Callable[[], Iterator[str]]

    def texts(self) -> Iterator[str]:
        return self._texts()


def cache_dir() -> Path:
    """``$LMZOO_CACHE``, else ``$XDG_CACHE_HOME/lmzoo``, else ``~/.cache/lmzoo``."""
    if os.environ.get("LMZOO_CACHE"):
        return Path(os.environ["LMZOO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmzoo"


def _not_utf8(where: object, offset: int, byte: int) -> DataError:
    return DataError(
        f"{where}: not valid UTF-8 at byte offset {offset} (byte 0x{byte:02x}); the char tokenizer needs "
        "UTF-8 text (byte and bpe take any bytes)"
    )


def decode_text(data: bytes, where: object, strict: bool) -> str:
    """UTF-8 text of ``data``; invalid bytes are surrogate-escaped, or a DataError when ``strict``."""
    if not strict:
        return data.decode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(where, e.start, data[e.start]) from None


SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # just after a newline between two non-space characters


def last_safe_cut(text: str, window: int = 1 << 16) -> int:
    """Where to end a piece of ``text``: just after its last newline between two non-space characters.

    Cutting there keeps the ids of every lmzoo tokenizer exact (see ``prepare.split_text``). A block
    without such a newline is cut after its last newline, or kept whole if it has none; a file like
    that (no line starting with text in 4 MB) may get different ids at that one boundary.
    """
    end = len(text)
    while end > 0:  # search backwards window by window: regexes only search forwards
        start = max(0, end - window)
        cuts = [m.start() for m in SAFE_CUT.finditer(text, start, end)]
        if cuts:
            return cuts[-1]
        end = start
    return text.rfind("\n") + 1 or len(text)


def iter_file_pieces(path: Path, strict: bool, piece_bytes: int | None = None) -> Iterator[str]:
    """The text of ``path`` in pieces of about ``piece_bytes``, cut where :func:`last_safe_cut` says.

    ``"".join(pieces)`` equals the decoded file. Memory stays at one piece whatever the file size.
    """
    piece_bytes = piece_bytes or PIECE_BYTES  # read at call time (tests shrink it)
    decoder = codecs.getincrementaldecoder("utf-8")("strict" if strict else "surrogateescape")
    offset = 0  # bytes read before the current block
    carry = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(piece_bytes)
            pending = decoder.getstate()[0]
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                data = pending + raw
                raise _not_utf8(path, offset - len(pending) + e.start, data[e.start]) from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = last_safe_cut(text)
            carry, text = text[cut:], text[:cut]
            if text:
                yield text


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise _not_utf8(f"{path}:{lineno}", start + e.start, raw[e.start]) from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            except (RecursionError, ValueError):  # nested past Python's recursion limit, a 5,000-digit number
                raise DataError(f"{path}:{lineno}: a JSON record nested too deeply or with a number too long") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                fields = ", ".join(sorted(record)[:10])
                raise DataError(
                    f"{path}:{lineno}: no field {field!r} (fields: {fields}){suggest(field, record)}; "
                    "choose it with text_field / --text-field"
                )
            value = record[field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is a {type(value).__name__}, not a string")
            yield value


def _text_column(names: list[str], field: str, where: object) -> None:
    if field not in names:
        raise DataError(
            f"{where}: no column {field!r} (columns: {', '.join(names[:10])}){suggest(field, names)}; "
            "choose it with text_field / --text-field"
        )


def _as_text(value: Any, where: object, strict: bool) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return decode_text(value, where, strict)
    raise DataError(f"{where}: text values must be strings, got {type(value).__name__}")


def _iter_parquet(path: Path, field: str, strict: bool) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'lmzoo[hf]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and others
        raise DataError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    _text_column(pf.schema_arrow.names, field, path)
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text = _as_text(value, path, strict)
            if text is not None:
                yield text


def _iter_rows(dataset: Any, field: str, where: str, strict: bool) -> Iterator[str]:
    """Rows of a ``datasets`` Dataset or streamed IterableDataset, in order."""
    names = getattr(dataset, "column_names", None)  # None for some streamed data sets
    if names:
        _text_column(list(names), field, where)
    for batch in dataset.iter(batch_size=1000):
        if field not in batch:
            _text_column(list(batch), field, where)
        for value in batch[field]:
            text = _as_text(value, where, strict)
            if text is not None:
                yield text


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _saved_dataset(path: Path, field: str, split: str, strict: bool) -> Source:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a saved data set; reading it needs datasets: pip install 'lmzoo[hf]'"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)}){suggest(split, list(ds))}")
        ds = ds[split]
    where = f"data set {path}"
    return Source(
        f"saved data set {path} ({split}, {len(ds)} rows)",
        False,
        ds.data.nbytes,
        lambda: _iter_rows(ds, field, where, strict),
    )


def _hub_dataset(name: str, field: str, split: str, strict: bool) -> Source:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} looks like a hub data set; that needs datasets: pip install 'lmzoo[hf]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, gated repo...: all one line for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not open hub data set {name!r} (split {split!r}): {msg}; without a network, save it "
            "elsewhere (save_to_disk, JSONL or Parquet) and pass that path"
        ) from None
    return Source(f"hub data set {name} ({split})", False, None, lambda: _iter_rows(ds, field, name, strict))


def _file_documents(path: Path, field: str, strict: bool) -> Iterator[str]:
    """Documents of one file inside a folder: records for JSONL/Parquet, else the whole file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path, field)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, field, strict)
    else:
        text = decode_text(path.read_bytes(), path, strict)
        if text:
            yield text


def _files_source(description: str, files: list[Path], field: str, strict: bool) -> Source:
    def texts() -> Iterator[str]:
        for p in files:
            yield from _file_documents(p, field, strict)

    return Source(description, False, sum(p.stat().st_size for p in files), texts)


def folder_files(root: Path) -> list[Path]:
    """Text, JSONL and Parquet files under ``root``, sorted by relative path; hidden entries skipped."""
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() in TEXT_SUFFIXES or p.suffix.lower() in RECORD_SUFFIXES:
            found.append((rel.as_posix(), p))
    return [p for _, p in sorted(found)]


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, the ``.py`` files of the standard library sorted by relative path, site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]  # never descend
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath, name)
                files.append((p.relative_to(root).as_posix(), p))
    return root, [p for _, p in sorted(files)]


def _stdlib_source() -> Source:
    root, files = stdlib_files()
    if not files:
        raise DataError(f"no .py files found in the standard library at {root}")

    def texts() -> Iterator[str]:
        for p in files:
            try:  # a handful of test files are deliberately not UTF-8: skipped, whatever the tokenizer
                text = p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text:
                yield text

    size = sum(p.stat().st_size for p in files)
    return Source(f"stdlib ({root}, {len(files)} .py files)", False, size, texts)


def shakespeare_path(input: str | os.PathLike | None = None) -> Path:
    """Tiny Shakespeare on disk: ``input`` if given, else the cached download (fetched once)."""
    if input is not None:
        path = Path(input)
        if not path.is_file():
            raise DataError(f"no such file: {path} (input= for the shakespeare source)")
        return path
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({reason}); download it yourself "
            "and pass input=PATH (--input PATH)"
        ) from None
    if not data:
        raise DataError(f"the download from {SHAKESPEARE_URL} was empty; pass input=PATH (--input PATH)")
    atomic_write_bytes(cached, data)
    return cached


def _single_file(path: Path, strict: bool, description: str | None = None) -> Source:
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty")
    return Source(description or f"text file {path}", True, size, lambda: iter_file_pieces(path, strict))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in TEXT_SUFFIXES | RECORD_SUFFIXES


def _with_limit(source: Source, limit: int | None) -> Source:
    if limit is None or source.single_text:
        return source
    if limit < 1:
        raise DataError(f"limit must be a positive number of documents, got {limit}")
    return Source(
        f"{source.description}, first {limit} documents",
        False,
        source.size_bytes,
        lambda: islice(source.texts(), limit),
    )


def open_source(
    source: str | os.PathLike,
    *,
    text_field: str = "text",
    input: str | os.PathLike | None = None,
    split: str = "train",
    strict_utf8: bool = False,
    limit: int | None = None,
) -> Source:
    """Resolve ``source`` (see the module docstring for the forms) into a :class:`Source`.

    An existing path wins over a built-in or hub name. ``limit`` keeps the first ``limit`` documents
    of a multi-document source. Raises DataError for a missing path, an empty file, a folder with no
    text files, a pattern matching nothing, or an unknown name (with close names suggested).
    """
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in RECORD_SUFFIXES:
            if path.stat().st_size == 0:
                raise DataError(f"{path} is empty")
            return _with_limit(
                _files_source(f"{suffix[1:]} file {path}", [path], text_field, strict_utf8), limit
            )
        return _single_file(path, strict_utf8)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _with_limit(_saved_dataset(path, text_field, split, strict_utf8), limit)
        files = folder_files(path)
        if not files:
            kinds = " ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
            raise DataError(f"folder {path} has no text files (looked for: {kinds})")
        return _with_limit(
            _files_source(f"folder {path} ({len(files)} files)", files, text_field, strict_utf8), limit
        )
    if any(ch in name for ch in "*?["):
        files = sorted(
            Path(p) for p in glob.glob(os.path.expanduser(name), recursive=True) if Path(p).is_file()
        )
        if not files:
            raise DataError(f"pattern {name!r} matches no files")
        return _with_limit(
            _files_source(f"files {name} ({len(files)})", files, text_field, strict_utf8), limit
        )
    if name == "stdlib":
        return _with_limit(_stdlib_source(), limit)
    if name == "shakespeare":
        p = shakespeare_path(input)
        return _single_file(p, strict_utf8, f"tiny shakespeare ({p})")
    if name.startswith("hf:") or ("/" in name and not _looks_like_path(name)):
        return _with_limit(_hub_dataset(name.removeprefix("hf:"), text_field, split, strict_utf8), limit)
    if _looks_like_path(name) or os.sep in name:
        raise DataError(f"no such file or folder: {name}")
    raise DataError(
        f"unknown source {name!r}: not a file or folder, not a built-in ({', '.join(BUILTINS)}), "
        f"and hub data sets are named owner/name or hf:NAME{suggest(name, BUILTINS)}"
    )
