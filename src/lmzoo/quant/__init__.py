"""Quantization applied from outside a model: converters that rewrite its layers.

A converter records what it did in ``model.quantization`` (a JSON-able dict with a ``method``);
checkpoints save that dict and :func:`apply_spec` rebuilds the same modules before the weights load.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmzoo.common import fmt_bytes
from lmzoo.errors import CheckpointError, ConfigError


def apply_spec(model: nn.Module, spec: Any) -> nn.Module:
    """Rewrite ``model`` as the saved quantization ``spec`` describes.

    ``spec`` comes from a checkpoint's config: anything but a mapping with a known ``method`` and
    well-formed fields is a one-line ConfigError (CheckpointError for an unknown method) naming it."""
    if not isinstance(spec, dict):
        raise ConfigError(f"expected a mapping with a 'method', got {spec!r}")
    if spec.get("method") == "bitnet":
        from lmzoo.quant import bitnet

        return bitnet.apply_spec(model, spec)
    if spec.get("method") == "int8":
        from lmzoo.quant import int8

        return int8.apply_spec(model, spec)
    raise CheckpointError(f"unknown quantization method {spec.get('method')!r} in the checkpoint")


def quantizable_linears(model: nn.Module, what: str = "quantization") -> list[str]:
    """The layers a quantizer converts by default: every ``nn.Linear`` of the blocks' mixer and
    feed-forward parts (:meth:`lmzoo.models.base.LanguageModel.part_linears`: the same rule in every
    family), except those their layer keeps in full precision (a layer's ``keep_precise`` names
    them with the reason: a mixture of experts' router, a selective SSM's small projections).
    ConfigError naming the family when nothing is left."""
    names = []
    for name in model.part_linears():
        parent, _, child = name.rpartition(".")
        if child not in getattr(model.get_submodule(parent), "keep_precise", {}):
            names.append(name)
    if not names:
        raise ConfigError(f"{what}: the {model.family} model has no linear layer in its blocks' mixer or ffn")
    return names


def check_module_list(modules: Any) -> list[str]:
    """``modules`` of a saved spec (a checkpoint's config may hold anything): a non-empty list of
    module names, each once; ConfigError otherwise."""
    if not isinstance(modules, list) or not modules or not all(isinstance(n, str) for n in modules):
        raise ConfigError(f"modules={modules!r}: expected a non-empty list of module names")
    if len(set(modules)) != len(modules):
        raise ConfigError("modules: a module is named twice")
    return modules


def check_linear_names(model: nn.Module, modules: Any) -> list[str]:
    """:func:`check_module_list`, every name an ``nn.Linear`` layer of ``model``; ConfigError naming
    the first that is not."""
    check_module_list(modules)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    bad = next((n for n in modules if n not in linears), None)
    if bad is not None:
        raise ConfigError(f"modules: {bad!r} is not an nn.Linear layer of this {type(model).__name__} model")
    return modules


def memory_lines(model: nn.Module) -> list[str]:
    """Lines for ``lmzoo info``: the memory a quantized model saves (empty when not quantized)."""
    spec = getattr(model, "quantization", None)
    if not spec or spec.get("method") != "bitnet":
        return []
    from lmzoo.quant import bitnet

    r = bitnet.memory_report(model)
    return [
        f"  quantization         BitNet {spec['variant']} on {r['layers']} layers ({r['weights']:,} weights)"
        + (", packed 2-bit" if spec.get("packed") else ""),
        f"  replaced weights     bf16 {fmt_bytes(r['bf16_bytes'])} -> 2-bit {fmt_bytes(r['packed_bytes'])} "
        f"({r['ratio']:.3f} of bf16)",
        f"  model weights        bf16 {fmt_bytes(r['model_bf16_bytes'])} -> "
        f"{fmt_bytes(r['model_packed_bytes'])} packed "
        f"(saves {fmt_bytes(r['saved_bytes'])})",
    ]

