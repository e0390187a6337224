"""BitNet applied from outside: rewrite the chosen ``nn.Linear`` layers of any model into BitLinear.

    model = lmzoo.build("gpt2-char-cpu")
    bitnet.convert(model, variant="b1.58")        # attention and MLP projections -> BitLinear
    ... train ...                                  # (the latent weights train with the STE)
    bitnet.pack(model)                             # inference: 2-bit codes, latent weights dropped
    print(bitnet.memory_report(model))

As in the papers the embeddings and the output head stay in full precision (they are a small
share of a large model and quantizing them hurts most); so do MoE routers. The converter records
what it did in ``model.quantization`` (a plain dict) so that a checkpoint can rebuild the same
modules before loading weights (:func:`apply_spec`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmzoo.errors import ConfigError
from lmzoo.layers.bitlinear import VARIANTS, BitLinear, PackedBitLinear, Variant, packed_weight_bytes
from lmzoo.quant import check_linear_names, quantizable_linears


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def convert(
    model: nn.Module,
    variant: Variant = "b1.58",
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    norm: bool = True,
) -> nn.Module:
    """Replace ``nn.Linear`` layers by :class:`BitLinear` layers sharing their weights; returns
    ``model`` (changed in place).

    ``targets`` None: the blocks' mixer and feed-forward linears (attention and MLP projections, MoE
    experts, a Mamba layer's in/out projections), but those a layer keeps precise
    (:func:`lmzoo.quant.quantizable_linears`: the router, an SSM's selective projections) — the same
    rule in every family. Otherwise ``targets`` are fnmatch patterns of qualified names (a saved spec
    lists exact names), minus ``exclude`` patterns. A weight tied to the embedding is never replaced.
    ``norm``: each BitLinear normalizes its input (RMSNorm) before quantizing it, as in the papers.
    Raises ConfigError for an unknown variant or when nothing matches.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown BitNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if getattr(model, "quantization", None):
        raise ConfigError(f"model is already quantized ({model.quantization['method']})")
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    wanted = set(quantizable_linears(model, "bitnet.convert")) if targets is None else None
    names = []
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or id(m.weight) in tied:  # a head tied to the embedding stays
            continue
        chosen = name in wanted if wanted is not None else any(fnmatch.fnmatchcase(name, p) for p in targets)
        if chosen and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            _set_module(model, name, BitLinear.from_linear(m, variant, norm))
            names.append(name)
    if not names:
        raise ConfigError(f"bitnet.convert: no nn.Linear matches {list(targets or ['the blocks mixer and ffn'])}")
    model.quantization = {"method": "bitnet", "variant": variant, "norm": norm, "modules": names, "packed": False}
    return model


@torch.no_grad()
def pack(model: nn.Module, block_rows: int = 256) -> nn.Module:
    """Replace every BitLinear by a :class:`PackedBitLinear` (inference only; the latent weights go)."""
    spec = getattr(model, "quantization", None)
    if not spec or spec.get("method") != "bitnet":
        raise ConfigError("bitnet.pack: the model has no BitLinear layers (run bitnet.convert first)")
    for name, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            _set_module(model, name, PackedBitLinear.from_bitlinear(m, block_rows))
    spec["packed"] = True
    return model


def check_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """ConfigError naming the first malformed field of a saved bitnet spec (read from a checkpoint's
    config, so anything may be there): ``variant`` one of VARIANTS, ``modules`` a non-empty list of the
    names of ``nn.Linear`` layers of ``model`` (exact names, no patterns), ``norm``/``packed`` booleans."""
    variant = spec.get("variant")
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r}: expected one of {', '.join(VARIANTS)}")
    for key in ("norm", "packed"):
        if not isinstance(spec.get(key, False), bool):
            raise ConfigError(f"{key}={spec[key]!r}: expected true or false")
    check_linear_names(model, spec.get("modules"))


def apply_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Rebuild the modules a saved ``model.quantization`` spec describes (before loading weights);
    ConfigError for a malformed spec (:func:`check_spec`)."""
    check_spec(model, spec)
    convert(model, spec["variant"], targets=spec["modules"], exclude=(), norm=spec.get("norm", True))
    if spec.get("packed"):
        pack(model)
    return model


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Weight memory of the replaced layers, bf16 vs packed 2-bit, and of the whole model.

    Computed from shapes (works on the meta device). ``ratio`` = packed / bf16 bytes of the replaced
    layers' weight matrices (codes + scale); ``layer_ratio`` adds their biases and norm gains (bf16).
    """
    n_layers = n_weights = bf16 = packed = extras = 0
    for m in model.modules():
        if isinstance(m, (BitLinear, PackedBitLinear)):
            n_layers += 1
            n_weights += m.in_features * m.out_features
            bf16 += 2 * m.in_features * m.out_features
            packed += packed_weight_bytes(m.in_features, m.out_features)
            extras += 2 * ((m.bias.numel() if m.bias is not None else 0)
                           + (m.norm.weight.numel() if m.norm is not None else 0))
    if not n_layers:
        raise ConfigError("memory_report: the model has no BitLinear layers")
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    # parameters outside the replaced matrices (a packed layer's codes are buffers, not parameters)
    latent = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    other = total - latent
    model_bf16 = 2 * (other + n_weights)  # every parameter in bf16 (latent weights included)
    model_packed = 2 * other + packed  # everything else bf16, replaced matrices packed
    return {
        "layers": n_layers,
        "weights": n_weights,
        "bf16_bytes": bf16,
        "packed_bytes": packed,
        "ratio": packed / bf16,
        "layer_ratio": (packed + extras) / (bf16 + extras),
        "model_bf16_bytes": model_bf16,
        "model_packed_bytes": model_packed,
        "saved_bytes": model_bf16 - model_packed,
    }
