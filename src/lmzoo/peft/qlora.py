"""QLoRA (Dettmers et al. 2023): a frozen NF4-quantized base model with LoRA adapters on top.

    report = apply_qlora(model, target="mixer|ffn", r=8)   # quantize, then inject LoRA

:func:`quantize_model` replaces linear layers by :class:`~lmzoo.quant.nf4.NF4Linear` (4-bit weights,
dequantized on the fly), from outside the model; :func:`apply_qlora` then wraps the chosen ones in
:class:`~lmzoo.peft.lora.LoRALinear` whose A and B are float32 and the only trainable parameters. Gradients
flow *through* the dequantized weight to the input but never into it. Embeddings, norms and a tied
output head stay in their dtype (as in the paper, which quantizes the linear layers of the blocks).
The adapters save on their own (:func:`lmzoo.peft.lora.save_adapter`); the base is re-quantized from
its original checkpoint when loaded again (quantization is deterministic).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lmzoo.errors import ConfigError
from lmzoo.peft.lora import LoRAConfig, LoRALinear, _set_module, apply_lora
from lmzoo.quant import check_linear_names, quantizable_linears
from lmzoo.quant.nf4 import NF4Linear


def quant_targets(model: nn.Module, target: str | None = None) -> list[str]:
    """The linear layers NF4 quantizes: ``target`` a regex searched in module names, or None for the
    blocks' mixer and feed-forward linears but those a layer keeps precise
    (:func:`lmzoo.quant.quantizable_linears`: every family alike; the head, the embedding, a router stay)."""
    if target is None:
        return quantizable_linears(model, "NF4")
    pattern = re.compile(target)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and pattern.search(n)]


def quantize_model(
    model: nn.Module, target: str | None = None, compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
) -> list[str]:
    """Replace the linear layers :func:`quant_targets` names by NF4Linear layers, in place; the model
    is frozen. Returns the names replaced; ConfigError when none matches."""
    names = quant_targets(model, target)
    if not names:
        raise ConfigError(f"quantization target {target!r} matches no nn.Linear module")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, NF4Linear(model.get_submodule(name), compute_dtype, double_quant))
    model.nf4 = {"method": "nf4", "modules": names, "double_quant": double_quant,
                 "compute_dtype": str(compute_dtype).removeprefix("torch.")}
    return names


def apply_spec(model: nn.Module, spec: Any) -> nn.Module:
    """Re-quantize the layers a checkpoint's config records (``lmzoo.nf4``, written by :func:`lmzoo.save`
    from ``model.nf4``) on a freshly built model, before its weights (the NF4 buffers) load.
    ConfigError naming the first malformed field, or a module the model lacks."""
    if not isinstance(spec, dict) or spec.get("method") != "nf4":
        raise ConfigError(f"expected a mapping with method 'nf4', got {spec!r}")
    modules = check_linear_names(model, spec.get("modules"))
    double_quant = spec.get("double_quant", True)
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant={double_quant!r}: expected true or false")
    name = spec.get("compute_dtype", "float32")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"compute_dtype={name!r}: expected a floating-point torch dtype name")
    if getattr(model, "nf4", None):
        raise ConfigError("the model is already NF4-quantized")
    quantize_model(model, "^(" + "|".join(re.escape(n) for n in modules) + ")$", dtype, double_quant)
    return model


def apply_qlora(
    model: nn.Module, cfg: LoRAConfig | None = None, quant_target: str | None = None,
    compute_dtype: torch.dtype = torch.bfloat16, **kwargs: Any,
) -> dict[str, Any]:
    """Quantize the linear layers to NF4, then inject LoRA (``cfg`` or :class:`LoRAConfig` fields).
    Returns :func:`apply_lora`'s report plus :func:`memory_report`'s."""
    quantize_model(model, quant_target, compute_dtype)
    report = apply_lora(model, cfg, **kwargs)
    return {**report, **memory_report(model)}


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Put plain ``nn.Linear`` layers (dequantized weights) back, keeping any LoRA wrapper around them,
    so adapters can be merged (e.g. before :func:`lmzoo.peft.lora.export_merged_hf`)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.packed.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.to(dtype))
            lin.requires_grad_(False)
            _set_module(model, name, lin)
    model.nf4 = None
    return model


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Weight memory of a (partly) NF4-quantized model against the same model in bf16.

    ``quantized_bytes``/``quantized_bf16_bytes``: the NF4 layers' stored bytes and their bf16 size;
    ``model_bytes``: the base model's weights as stored (non-quantized tensors counted at bf16, 2 bytes;
    LoRA adapters not included: they are ``adapter_bytes``, in bf16); ``model_bf16_bytes``: the same
    model unquantized in bf16. ``ratio`` = model_bytes / model_bf16_bytes; ``quantized_ratio`` for the
    quantized layers alone (~4.13/16 = 0.258). Embeddings and norms stay unquantized, so ``ratio`` is
    near 0.26 when the blocks' linear layers dominate (e.g. ~96% of Llama-2-7B's weights).
    """
    q_bytes = q_bf16 = 0
    n_layers = 0
    nf4_params = set()
    for m in model.modules():
        if isinstance(m, NF4Linear):
            n_layers += 1
            q_bytes += m.weight_bytes()
            q_bf16 += 2 * m.in_features * m.out_features
            if m.bias is not None:
                nf4_params.add(id(m.bias))
    other = adapters = 0
    for name, p in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        if name.endswith(("lora_A", "lora_B")):
            adapters += 2 * p.numel()
        else:
            other += 2 * p.numel()  # bf16; NF4 biases included here, counted once
    model_bytes = q_bytes + other
    model_bf16 = q_bf16 + other
    return {
        "nf4_layers": n_layers,
        "quantized_bytes": q_bytes,
        "quantized_bf16_bytes": q_bf16,
        "quantized_ratio": q_bytes / q_bf16 if q_bf16 else 1.0,
        "adapter_bytes": adapters,
        "model_bytes": model_bytes,
        "model_bf16_bytes": model_bf16,
        "ratio": model_bytes / model_bf16 if model_bf16 else 1.0,
    }


def nf4_bytes(n_weights: int) -> int:
    """Stored bytes of ``n_weights`` in NF4 with double quantization: packed 4-bit indices, an int8 absmax
    per 64 weights, a float32 scale per 256 absmax, one float32 mean."""
    blocks = -(-n_weights // 64)
    return blocks * 32 + blocks + 4 * -(-blocks // 256) + 4


def estimate(model: nn.Module, target: str | None = None) -> dict[str, Any]:
    """:func:`memory_report`'s ``ratio`` for the model as if :func:`quantize_model` ran, from shapes only
    (works on a model built on the meta device, e.g. in ``lmzoo info --nf4``)."""
    q_ids = {id(model.get_submodule(n).weight) for n in quant_targets(model, target)}
    q_bytes = q_bf16 = other = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in q_ids:
            q_bytes += nf4_bytes(p.numel())
            q_bf16 += 2 * p.numel()
        else:
            other += 2 * p.numel()
    return {"quantized_bytes": q_bytes, "quantized_bf16_bytes": q_bf16, "model_bytes": q_bytes + other,
            "model_bf16_bytes": q_bf16 + other, "ratio": (q_bytes + other) / max(q_bf16 + other, 1)}


def memory_lines(model: nn.Module) -> list[str]:
    """Lines for ``lmzoo info`` (empty when nothing is NF4-quantized)."""
    r = memory_report(model)
    if not r["nf4_layers"]:
        if not any(type(m) is nn.Linear for m in model.modules()):
            return []
        e = estimate(model)  # not quantized: what NF4 would give
        before, after = e["model_bf16_bytes"] / 2**20, e["model_bytes"] / 2**20
        return [f"  NF4 (QLoRA) weights  bf16 {before:.2f} MB -> {after:.2f} MB "
                f"({e['ratio']:.3f} of bf16; linear layers in NF4, embeddings and norms bf16)"]
    mb = 1024 * 1024
    return [
        f"  quantization         NF4 + double quantization on {r['nf4_layers']} linear layers",
        f"  quantized weights    bf16 {r['quantized_bf16_bytes'] / mb:.2f} MB -> {r['quantized_bytes'] / mb:.2f} MB "
        f"({r['quantized_ratio']:.3f} of bf16)",
        f"  model weights        bf16 {r['model_bf16_bytes'] / mb:.2f} MB -> {r['model_bytes'] / mb:.2f} MB "
        f"({r['ratio']:.3f} of bf16)",
    ]


__all__ = ["LoRALinear", "apply_qlora", "dequantize_model", "memory_lines", "memory_report", "quantize_model"]
