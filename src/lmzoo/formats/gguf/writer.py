"""``to_gguf``: an lmzoo model (and its tokenizer) as a GGUF file that llama.cpp runs.

The model goes through its family's Hugging Face converter first (``config_to_hf``,
``state_to_hf``: the same refusals as :func:`lmzoo.to_hf`), then :mod:`.arch` renames the HF tensors
to llama.cpp's, permutes Llama's Q/K rows back to interleaved pairs and stacks experts; the
``gguf`` package's ``GGUFWriter`` writes the file and its ``quantize`` makes the blocks.

Tensor types (``dtype``): ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``. As llama.cpp's
converter does, 1-D tensors (norms, biases), the position table and MoE routers stay F32, and a
matrix whose rows are not whole blocks of 32 falls back to F16. Q8_0 stores each block of 32
weights as 32 int8 ``q`` and one f16 scale ``d = max|w| / 127``; a weight reads back as ``q * d``,
off by at most ``d / 2`` (plus the f16 rounding of ``d``): docs/gguf.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmzoo.errors import ConfigError, LmzooError
from lmzoo.formats.atomic import atomic_path
from lmzoo.formats.gguf.arch import ARCHS, FAMILY_ARCH
from lmzoo.formats.gguf.reader import gguf_module
from lmzoo.formats.gguf.tokenizer import tokenizer_metadata
from lmzoo.tokenizer import Tokenizer

# names a user may give -> ggml type name
DTYPE_NAMES = {"f32": "F32", "float32": "F32", "fp32": "F32", "f16": "F16", "float16": "F16", "fp16": "F16",
               "bf16": "BF16", "bfloat16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
# llama.cpp's general.file_type (enum llama_ftype) of a file whose matrices are of that type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


def gguf_type(dtype: str | torch.dtype | None, model_dtype: torch.dtype) -> str:
    """The ggml type name of ``dtype`` (None: the model's own float type)."""
    if dtype is None:
        dtype = model_dtype
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    name = DTYPE_NAMES.get(str(dtype).lower())
    if name is None:
        raise ConfigError(f"GGUF dtype {dtype!r} is not written; choose from f32, f16, bf16, q8_0, q4_0, q4_1")
    return name


def add_metadata(writer: Any, values: dict[str, Any]) -> None:
    """Typed as llama.cpp reads them: counts and token ids uint32, numbers float32, token types int32."""
    for key, v in values.items():
        if isinstance(v, bool):
            writer.add_bool(key, v)
        elif isinstance(v, int):
            writer.add_uint32(key, v)
        elif isinstance(v, float):
            writer.add_float32(key, v)
        elif isinstance(v, str):
            writer.add_string(key, v)
        elif isinstance(v, list):
            writer.add_array(key, v)
        else:
            raise TypeError(f"metadata {key}: {type(v).__name__}")


def to_gguf(model: Any, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
            tokenizer: Tokenizer | None = None, name: str | None = None) -> Path:
    """Write ``model`` (a Llama-family or GPT-2 lmzoo model) as a GGUF file at ``path``, atomically.

    ``dtype``: the type of the matrices (see the module docstring; None: the model's float type);
    ``tokenizer``: written as ``tokenizer.*`` metadata (byte-level BPE or lmzoo's byte tokenizer; with
    its chat template), without which llama.cpp cannot run the file (lmzoo and transformers load it).
    ConfigError naming what GGUF cannot hold: another family, multi-token heads, quantized or LoRA
    layers (merge them first), a sliding window, a RoPE scaling other than linear... Returns ``path``.
    """
    from lmzoo.formats.hf import CONVERTERS, check_exportable

    gguf = gguf_module()
    check_exportable(model, target="GGUF")
    family = getattr(model, "family", type(model).__name__)
    if family not in FAMILY_ARCH:
        raise ConfigError(f"no GGUF export for the {family!r} family; exportable: {', '.join(sorted(FAMILY_ARCH))}")
    arch = ARCHS[FAMILY_ARCH[family]]
    conv = next(c for c in CONVERTERS.values() if c.family == family)
    hf = conv.config_to_hf(model.config)
    metadata = arch.metadata(hf)
    qname = gguf_type(dtype, model.dtype)
    qtype = gguf.GGMLQuantizationType[qname]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    head: dict[str, Any] = {"general.name": name or f"lmzoo {family}", "general.file_type": FILE_TYPES[qname]}
    if block > 1:
        head["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    tok_meta = tokenizer_metadata(tokenizer, hf["vocab_size"]) if tokenizer is not None else {}

    final = Path(path)
    with atomic_path(final) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        add_metadata(writer, {**head, **metadata, **tok_meta})
        try:
            state = conv.state_to_hf(model.state_dict(), model.config)
            for gguf_name, t, row in arch.from_hf(state, hf):
                values = t.detach().to(device="cpu", dtype=torch.float32).numpy()
                kind = qtype if values.ndim > 1 and row.quantize else gguf.GGMLQuantizationType.F32
                if values.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
                    kind = gguf.GGMLQuantizationType.F16  # rows that are not whole blocks (llama.cpp's fallback)
                data = gguf.quants.quantize(np.ascontiguousarray(values), kind)
                writer.add_tensor(gguf_name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
        except LmzooError as e:  # a tensor without a GGUF name (the converters name it)
            raise ConfigError(f"cannot export the {family} model as GGUF: {e}") from None
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return final
