"""Load Hugging Face ``transformers`` checkpoints into lmzoo models, and export them back.

    model = from_hf("path/to/gpt2")          # a local directory: config.json + weights
    to_hf(model, "out/gpt2")                 # loads with GPT2LMHeadModel.from_pretrained("out/gpt2")

Nothing is ever downloaded: ``path`` is a local directory.

How a load works (see docs/checkpoints-hf.md):

1. ``config.json`` names the architecture (``model_type``, else ``architectures``); the
   converter registered for it maps the HF config to an lmzoo config, refusing settings lmzoo
   cannot compute exactly.
2. The lmzoo model is built on the **meta device**: parameters have shapes but no storage, so
   no memory is allocated and no initialization is run for weights about to be replaced.
3. Tensors stream in from the files (:mod:`lmzoo.formats.tensors`), are renamed / transposed by
   the converter, checked against the model's shapes, cast and moved to ``device`` one by one
   (a tensor still viewing the file's memory map is copied, so the model owns its memory).
4. ``load_state_dict(assign=True)`` makes those tensors the parameters (no copy into
   pre-allocated ones). Tied weights (``lm_head`` = ``wte``) are stored once in the file and
   re-tied afterwards so they stay one Parameter.
5. Non-persistent buffers (RoPE's cos/sin tables) are not in any checkpoint; built on meta they
   hold no values, so :func:`materialize_buffers` recomputes them on ``device``.

Adding a family is one line: write ``hf_<family>.py`` with a class that follows the
:class:`Converter` protocol and ``register()`` an instance at the bottom of this file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmzoo.common import resolve_dtype
from lmzoo.config import Config
from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.formats import tensors as io
from lmzoo.formats.hf import fields, gpt2, jamba, llama, mamba
from lmzoo.layers.rope import RotaryEmbedding, rope_frequencies
from lmzoo.memguard import MetaWithoutInit, check_fits
from lmzoo.models import build_model
from lmzoo.models.base import LanguageModel


class Converter(Protocol):
    """What a family's HF converter provides (structural: no base class to inherit)."""

    family: str  # the lmzoo family it builds, a key of lmzoo.models.FAMILIES
    model_types: tuple[str, ...]  # HF config "model_type" values it reads
    architectures: tuple[str, ...]  # HF config "architectures" entries it reads

    def config_from_hf(self, hf: Mapping[str, Any]) -> Config:
        """HF config dict -> lmzoo config; CheckpointError for what lmzoo cannot represent."""
        ...

    def config_to_hf(self, cfg: Any) -> dict[str, Any]:
        """lmzoo config -> HF config dict; ConfigError naming the fields HF's model lacks."""
        ...

    def state_from_hf(
        self, tensors: Iterable[tuple[str, torch.Tensor]], cfg: Any, expected: Mapping[str, tuple[int, ...]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream of HF ``(name, tensor)`` -> stream of lmzoo ``(name, tensor)``.

        A generator, so a converter may hold back pieces until it can emit a fused tensor (e.g.
        Llama's separate q/k/v into one ``qkv``). Shape errors name the HF tensor.
        """
        ...

    # Optional: ``source_name(name) -> str``, the HF name an lmzoo tensor is read from, used to
    # name a missing tensor in the file's terms (without it the lmzoo name is shown); and
    # ``ignores(hf_name) -> bool``, true for a buffer the converter drops (it may be non-floating:
    # every other tensor of the file must be floating point).

    def state_to_hf(self, state: Mapping[str, torch.Tensor], cfg: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """lmzoo state dict -> HF ``(name, tensor)`` pairs, contiguous, tied weights once."""
        ...


CONVERTERS: dict[str, Converter] = {}  # HF model_type -> converter


def register(converter: Converter) -> None:
    """Make ``from_hf`` read the converter's model types and ``to_hf`` write its family."""
    for model_type in converter.model_types:
        CONVERTERS[model_type] = converter


def supported() -> list[str]:
    """The HF ``model_type`` values :func:`from_hf` reads."""
    return sorted(CONVERTERS)


def detect(hf_config: Mapping[str, Any], where: str = "config.json") -> Converter:
    """The converter for an HF config: by ``model_type``, else by an ``architectures`` entry."""
    model_type = hf_config.get("model_type")
    if model_type in CONVERTERS:
        return CONVERTERS[model_type]
    archs = hf_config.get("architectures") or []
    for conv in CONVERTERS.values():
        if any(a in conv.architectures for a in archs if isinstance(a, str)):
            return conv
    what = f"model_type {model_type!r}" if model_type else f"architectures {archs!r}"
    raise CheckpointError(
        f"{where}: unsupported architecture ({what}); supported model types: {', '.join(supported())}"
    )


def _converter_for_family(family: str) -> Converter:
    for conv in CONVERTERS.values():
        if conv.family == family:
            return conv
    exportable = sorted({c.family for c in CONVERTERS.values()})
    raise ConfigError(
        f"no Hugging Face export for the {family!r} family; exportable: {', '.join(exportable)}"
    )


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for parameters registered under several names (weight tying).

    The canonical name is the first one ``named_parameters`` visits (``wte.weight`` for GPT).
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def retie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make every alias the very same Parameter as its canonical name again."""
    for alias, canonical in aliases.items():
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(canonical))


def _rope_buffers(m: RotaryEmbedding, device: torch.device) -> None:
    n = m.cos.shape[0]  # the table length chosen at construction (meta tensors keep their shape)
    m.inv_freq = rope_frequencies(m.head_dim, m.theta).to(device)
    m._build(n)  # computes cos/sin on inv_freq's device


# Layers whose non-persistent buffers are computed in __init__, and how to recompute them. A layer
# may instead define ``reset_buffers(device)``; either way a model built on meta gets real values.
BUFFER_BUILDERS: dict[type[nn.Module], Callable[[Any, torch.device], None]] = {RotaryEmbedding: _rope_buffers}


def materialize_buffers(
    model: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None
) -> None:
    """Recompute on ``device`` the buffers left on the meta device (non-persistent ones).

    ``dtype`` casts floating buffers as ``model.to(dtype)`` would, so a converted model equals
    one built normally and cast. Raises RuntimeError naming any buffer still on meta after.
    """
    device = torch.device(device)
    for name, m in model.named_modules():
        if not any(b.is_meta for b in m.buffers(recurse=False)):
            continue
        builder = BUFFER_BUILDERS.get(type(m))  # exact type: a subclass may compute other values
        if callable(getattr(m, "reset_buffers", None)):  # the layer's own method comes first
            m.reset_buffers(device)
        elif builder is not None:
            builder(m, device)
        else:
            raise RuntimeError(
                f"cannot materialize the buffers of {name or 'the model'} ({type(m).__name__}): "
                "register a builder in lmzoo.formats.hf.BUFFER_BUILDERS or give it reset_buffers(device)"
            )
        if dtype is not None:
            for bname, b in m.named_buffers(recurse=False):
                if b.is_floating_point():
                    setattr(m, bname, b.to(dtype))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers still on the meta device: {', '.join(left[:5])}")


def checked_config(conv: Converter, hf_config: Mapping[str, Any], where: str | Path) -> Config:
    """The converter's lmzoo config, every failure a one-line CheckpointError naming ``where``."""
    try:
        # types first: "hidden_size='64': expected a positive integer" (64.0 is read as 64)
        return conv.config_from_hf(fields.check_fields(hf_config))
    except LmzooError as e:  # the converter's refusals, or the lmzoo config's (n_embd % n_head != 0)
        raise CheckpointError(f"{where}: {e}") from None
    except (TypeError, ValueError, KeyError, ArithmeticError, AttributeError) as e:  # a value not foreseen
        raise CheckpointError(f"{where}: invalid value in the config ({type(e).__name__}: {io._one_line(e)})") from None


def from_hf(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
    check_memory: bool = True,
) -> LanguageModel:
    """Load a local Hugging Face ``transformers`` model directory as an lmzoo model, in eval mode.

    ``path`` holds ``config.json`` and the weights (``model.safetensors``, a sharded
    ``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded index; ``.bin`` only
    through ``torch.load(weights_only=True)``). ``dtype`` None keeps the checkpoint's dtype (of
    its first floating tensor); otherwise weights and floating buffers are cast. Weights are
    placed on ``device`` as they are read; peak memory is about the model plus one tensor.

    Raises CheckpointError (one line) for: a missing file (named), an unsupported architecture
    (naming the supported ones), a config lmzoo cannot represent exactly, an unreadable,
    truncated, corrupted (checksum) or refused weights file, or a missing, unexpected or mis-shaped
    tensor (named, with both shapes). A model whose estimated memory exceeds what ``device`` has
    available raises :class:`lmzoo.memguard.ModelTooLargeError` before anything is allocated.
    """
    d = Path(path)
    hf_config = io.read_config(d)
    conv = detect(hf_config, str(d / io.CONFIG))
    cfg = checked_config(conv, hf_config, d / io.CONFIG)
    files = io.weight_files(d)  # every file checked to exist before any work
    saved = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return load_converted(conv, cfg, io.iter_tensors(files), str(d), dtype, device, check_memory,
                          saved_dtype=saved if isinstance(saved, str) else None)


def load_converted(
    conv: Converter, cfg: Config, tensors: Iterable[tuple[str, torch.Tensor]], where: str,
    dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu", check_memory: bool = True,
    saved_dtype: str | None = None, owned: bool = False,
) -> LanguageModel:
    """The model of ``cfg`` filled from a stream of HF-named ``tensors`` through ``conv`` (the body of
    :func:`from_hf`, also used for GGUF files, whose tensors are renamed to HF names first).

    ``where`` prefixes the errors; ``saved_dtype`` (a dtype name) sizes the memory check when ``dtype``
    is None; ``owned``: the tensors are fresh (not views of a mapped file), so none needs copying.
    """
    d = where
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    # refuse a model that cannot fit before building it (lmzoo.memguard; check_memory=False skips)
    try:
        est_dtype = dtype or resolve_dtype(saved_dtype)
    except ConfigError:
        est_dtype = None
    check_fits(conv.family, cfg, device, est_dtype, where=str(d), check=check_memory)

    with MetaWithoutInit():  # shapes only: no allocation, and the initializers are skipped
        model = build_model(conv.family, cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    aliases = tied_aliases(model)

    state: dict[str, torch.Tensor] = {}
    sources: set[int] = set()  # storages of the tensors as read from the files

    ignored = getattr(conv, "ignores", lambda name: False)  # buffers the converter drops (GPT-2's masks)

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            if not t.is_floating_point() and not ignored(name):  # an int weight would be cast (or fused) silently
                raise CheckpointError(
                    f"{d}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}: "
                    "model weights must be floating point"
                )
            if not owned:
                sources.add(t.untyped_storage().data_ptr())
            yield name, t

    try:
        for name, t in conv.state_from_hf(read(), cfg, expected):
            if name in aliases:
                continue  # a tied copy (old .bin files store lm_head too): the canonical one is used
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} (not in the {conv.family} model)")
            if name in state:
                raise CheckpointError(f"tensor {name!r} is given twice")
            io.check_shape(name, t, expected[name])
            if t.is_floating_point():
                dtype = dtype or t.dtype
            # safetensors and torch.load(mmap=True) return views of a private mapping of the file. A
            # tensor the converter passed through unchanged is copied, so that the model owns its
            # memory: the file is unmapped when loading ends and a later truncation of it cannot
            # fault (SIGBUS). Tensors the converter made (transposed, fused) are already fresh.
            copy = t.untyped_storage().data_ptr() in sources
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=copy)
            del t
    except CheckpointError as e:  # io errors name their file already; converter errors get the directory
        raise (e if str(e).startswith(str(d)) else CheckpointError(f"{d}: {e}")) from None
    source_name = getattr(conv, "source_name", lambda k: k)
    missing = [source_name(k) for k in expected if k not in state and k not in aliases]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{d}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    model.load_state_dict(state, strict=True, assign=True)
    retie(model, aliases)  # assign=True made two Parameters of one tensor: make them one again
    materialize_buffers(model, device, dtype)
    return model.eval()


def check_exportable(model: nn.Module, allow: Iterable[str] = (), target: str = "Hugging Face") -> None:
    """ConfigError naming what ``model`` carries beyond its family's config, which a Hugging Face
    checkpoint cannot hold: extra multi-token heads, BitNet or NF4-quantized layers, LoRA wrappers.
    (The config's own inexpressible settings are the converters' ``config_to_hf`` refusals.)
    ``allow``: the kinds (``"lora"``, ``"nf4"``) a caller handles itself (:func:`lmzoo.peft.export_peft`);
    ``target``: the format named in the message (``"GGUF"`` for :func:`lmzoo.formats.gguf.to_gguf`).
    """
    kinds = {getattr(m, "rewrite", None) for m in model.modules()}  # what a converter put in a layer's place
    problems = []
    if getattr(model, "n_future", None):
        problems.append(f"multi-token prediction heads (n_future={model.n_future}; HF's model has one head: "
                        "export model.base for the next-token head alone)")
    if "bitnet" in kinds:
        problems.append("BitNet-quantized layers (HF's model has plain linear layers)")
    if "nf4" in kinds and "nf4" not in allow:
        problems.append("NF4-quantized layers (dequantize first: lmzoo.peft.qlora.dequantize_model)")
    if "lora" in kinds and "lora" not in allow:
        problems.append("LoRA adapters (merge them: lmzoo.peft.merge_lora(model, unwrap=True) or export_merged_hf)")
    if problems:
        raise ConfigError(f"cannot export the {model.family} model as {target}: " + "; ".join(problems))


def to_hf(model: LanguageModel, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory (``config.json`` + ``model.safetensors``), atomically.

    The result loads with ``transformers``' ``AutoModelForCausalLM.from_pretrained(path)`` and
    computes the same logits. ``dtype`` None keeps the model's dtype. Raises ConfigError naming
    the fields that keep the model from being expressed in the HF architecture (e.g. RoPE for
    GPT-2, linear attention) or the rewrites it carries (:func:`check_exportable`: multi-token
    heads, quantized layers, LoRA). Returns ``path``.
    """
    check_exportable(model)
    conv = _converter_for_family(model.family)
    hf_config = conv.config_to_hf(model.config)
    dtype = resolve_dtype(dtype) or model.dtype
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    tensors: dict[str, torch.Tensor] = {}
    try:
        for name, t in conv.state_to_hf(model.state_dict(), model.config):
            tensors[name] = t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype)
    except LmzooError as e:
        raise CheckpointError(f"cannot export the {model.family} model: {e}") from None
    return io.write_hf_dir(path, hf_config, tensors)


register(gpt2.GPT2Converter())
register(llama.LlamaConverter())
register(mamba.MambaConverter())
register(jamba.JambaConverter())

__all__ = [
    "CONVERTERS",
    "Converter",
    "check_exportable",
    "checked_config",
    "detect",
    "from_hf",
    "load_converted",
    "materialize_buffers",
    "register",
    "supported",
    "to_hf",
]
