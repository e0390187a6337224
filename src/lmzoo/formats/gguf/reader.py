"""Reading a GGUF file: its metadata, its tensor table, and each tensor dequantized on demand.

A GGUF file (llama.cpp's format; docs/gguf.md) is, all little-endian::

    magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type u32, value)          the metadata
    tensor_count x  (name: string, n_dims u32, dims u64[n_dims], ggml_type u32, offset u64)
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset

A string is ``u64 length + UTF-8 bytes``; an array is ``element type u32 + count u64 + elements``.
``dims`` run innermost first (ggml's ``ne[0]`` is a row's length), the reverse of torch's order;
quantized types store each row as blocks of ``block_size`` values in ``type_size`` bytes.

Why not ``gguf.GGUFReader``: it trusts every count in the file. An array that claims 10^12
elements makes it loop (and grow a list) for ever, and a tensor whose dimensions overflow 64 bits
gets a size of 0. This reader checks every count against the bytes left in the file *before*
it reads or allocates anything, so a hostile or truncated file costs at most its own size and
fails with one line (:class:`~lmzoo.errors.CheckpointError`). It also reads the 49,152-token
vocabulary of SmolLM2 in ~0.1 s where GGUFReader takes ~4 s (a numpy view per string).
``tests/test_gguf.py`` checks it against GGUFReader field by field. The dequantization itself
is the ``gguf`` package's (:func:`gguf.quants.dequantize`), as are the type tables.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmzoo.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted in 32 bits and is not written any more
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 3  # arrays of arrays of arrays: deeper is no file llama.cpp writes

# metadata value types (GGUFValueType): struct format of the fixed-size ones
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
NUMPY_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
               7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
# the fewest bytes an element of each type takes: bounds an array's count by the bytes left
MIN_SIZE = {**{t: struct.calcsize("<" + f) for t, f in SCALAR_FORMATS.items()}, STRING: 8, ARRAY: 12}
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
              8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}

# tensor types read as plain values (the rest go through gguf.quants.dequantize)
_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # F32, F16, BF16


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading or writing GGUF files needs gguf: pip install 'lmzoo[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, checked: its data lies inside the file."""

    name: str
    shape: tuple[int, ...]  # torch order (outermost first): a (out, in) weight is ggml's ne = [in, out]
    ggml_type: int
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


def type_name(ggml_type: int) -> str:
    """``'Q4_1'`` for 3; ``'type 99'`` for an id the gguf package does not know."""
    try:
        return gguf_module().GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def dequantizable() -> list[str]:
    """Names of the tensor types :meth:`GGUFFile.tensor` reads (F32, F16, BF16 and every block type the
    gguf package dequantizes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, the IQ types...)."""
    from gguf import quants

    traits = getattr(quants, "_type_traits", {})  # the block types gguf implements, keyed by type
    return [type_name(t) for t in sorted({*_FLOAT_TYPES, *(int(t) for t in traits)})]


class _Cursor:
    """Reads little-endian values from the mapped file, refusing to go past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated GGUF file: {what} needs {n:,} bytes at offset {self.pos:,}, "
                            f"the file has {self.size - self.pos:,} left")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def count(self, n: int, min_size: int, what: str) -> int:
        """``n`` items of at least ``min_size`` bytes each must fit in what is left of the file."""
        if n * min_size > self.size - self.pos:
            raise self.fail(f"{what} claims {n:,} items but only {self.size - self.pos:,} bytes remain "
                            "(a truncated or corrupt GGUF file)")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in SCALAR_FORMATS:
            v = self.scalar(SCALAR_FORMATS[vtype], what)
            return bool(v) if vtype == 7 else v
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        etype = self.scalar("I", what)
        n = self.scalar("Q", what)
        if etype not in MIN_SIZE:
            raise self.fail(f"{what} is an array of unknown value type {etype}")
        if etype == ARRAY and depth >= MAX_NESTING:
            raise self.fail(f"{what} nests arrays deeper than {MAX_NESTING} levels")
        self.count(n, MIN_SIZE[etype], what)
        if etype in NUMPY_TYPES:  # numbers: one copy, exactly their size in the file
            arr = np.frombuffer(self.buf, dtype=np.dtype(NUMPY_TYPES[etype]).newbyteorder("<"), count=n,
                                offset=self.pos).copy()
            self.pos += arr.nbytes
            return arr.tolist() if n <= 64 else arr  # small ones (e.g. rope sections) as plain lists
        return [self.value(etype, what, depth + 1) for _ in range(n)]


class GGUFFile:
    """A parsed and checked GGUF file: ``metadata`` (key -> value), ``tensors`` (name -> TensorInfo).

    Metadata values are Python scalars, strings, lists, or numpy arrays (numeric arrays longer than
    64). The tensor data stays in the file (memory-mapped) until :meth:`tensor` reads one; use as a
    context manager, or call :meth:`close`, to unmap it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4 or f.read(4) != MAGIC:
                raise CheckpointError(f"{self.path}: not a GGUF file (it does not start with the bytes 'GGUF')")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(_Cursor(self._map, self.path))
        except BaseException:
            self.close()
            raise

    def _parse(self, c: _Cursor) -> None:
        c.pos = 4
        self.version = c.scalar("I", "the version")
        if self.version not in VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", self.version))[0]
            hint = " (a big-endian file: lmzoo reads little-endian GGUF)" if swapped in VERSIONS else ""
            raise c.fail(f"GGUF version {self.version} is not read (versions {', '.join(map(str, VERSIONS))}){hint}")
        n_tensors = c.scalar("Q", "the tensor count")
        n_kv = c.scalar("Q", "the metadata count")
        c.count(n_kv, 8 + 4 + 1, "the metadata count")  # key length, value type, the smallest value
        c.count(n_tensors, 8 + 4 + 4 + 8, "the tensor count")  # name length, n_dims, type, offset
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.scalar("I", f"metadata {key!r}")
            if key in self.metadata:
                raise c.fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = c.value(vtype, f"metadata {key!r}")
        gguf = gguf_module()
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            n_dims = c.scalar("I", f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
            c.need(8 * n_dims, f"tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", c.buf, c.pos)
            c.pos += 8 * n_dims
            ggml_type = c.scalar("I", f"tensor {name!r}")
            offset = c.scalar("Q", f"tensor {name!r}")
            raw.append((name, dims, ggml_type, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise c.fail(f"general.alignment={alignment!r}: expected a power of two")
        self.alignment = alignment
        self.data_start = -(-c.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, offset in raw:
            if name in self.tensors:
                raise c.fail(f"tensor {name!r} appears twice")
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise c.fail(f"tensor {name!r} has unknown tensor type {ggml_type} "
                             f"(this gguf package knows {len(gguf.GGML_QUANT_SIZES)} types)") from None
            if any(d == 0 for d in dims):
                raise c.fail(f"tensor {name!r} has a zero dimension {list(dims)}")
            if dims[0] % block:
                raise c.fail(f"tensor {name!r}: rows of {dims[0]} values are not whole {qtype.name} blocks of {block}")
            n = 1
            for d in dims:
                n *= d  # Python ints: no overflow, whatever the file claims
            nbytes = n // block * type_size
            start = self.data_start + offset
            if offset % alignment:
                raise c.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
            if start + nbytes > c.size:
                raise c.fail(f"truncated GGUF file: tensor {name!r} ({qtype.name} {list(reversed(dims))}) needs "
                             f"bytes up to {start + nbytes:,}, the file has {c.size:,}")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), int(ggml_type), start, nbytes)

    # -- metadata ------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: general.architecture is missing (not a model GGUF file?)")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    # -- tensors -------------------------------------------------------------------------------------
    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes, a read-only uint8 view of the file shaped (*outer dims, bytes per row): the
        layout gguf's dequantize takes."""
        block, type_size = gguf_module().GGML_QUANT_SIZES[gguf_module().GGMLQuantizationType(info.ggml_type)]
        shape = (*info.shape[:-1], info.shape[-1] // block * type_size)
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(shape)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` dequantized to ``dtype``, in torch's shape order, owning its memory."""
        info = self.tensors[name]
        if info.ggml_type in _FLOAT_TYPES:  # copied out of the file first (the map is read-only, and closes)
            values = torch.from_numpy(self.raw(info).copy()).view(_FLOAT_TYPES[info.ggml_type])
            return values.reshape(info.shape).to(dtype)
        from gguf import quants

        try:
            values = quants.dequantize(self.raw(info), gguf_module().GGMLQuantizationType(info.ggml_type))
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {info.type_name}, which the gguf package "
                                  f"cannot dequantize (readable: {', '.join(dequantizable())})") from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape).to(dtype)

    def check_readable(self, names: Iterator[str] | None = None) -> None:
        """CheckpointError naming the first tensor whose type cannot be dequantized (before reading any)."""
        ok = set(dequantizable())
        for name in names if names is not None else self.tensors:
            info = self.tensors[name]
            if info.type_name not in ok:
                raise CheckpointError(f"{self.path}: tensor {name!r} has type {info.type_name}, which lmzoo cannot "
                                      f"dequantize (readable: {', '.join(sorted(ok))})")

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:  # a view is still alive (a caller kept a raw() array): leave it to the GC
                pass
            self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read(path: str | os.PathLike) -> GGUFFile:
    """Parse and check the GGUF file at ``path`` (one-line CheckpointError for anything wrong)."""
    return GGUFFile(path)
