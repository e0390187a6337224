"""Numeric precision of a training run, applied from outside the model (docs/mixed-precision.md).

Three independent choices, each a TrainConfig field:

- ``dtype``, the **compute** dtype: matmuls run under ``torch.autocast`` in bfloat16 or float16
  (Micikevicius et al. 2018, "Mixed Precision Training"); float32 disables autocast. float16
  needs a loss scale (``torch.amp.GradScaler``): its 5-bit exponent underflows small gradients.
- ``param_dtype``, the **storage** dtype of weights, and so of gradients and AdamW's moments
  (PyTorch keeps optimizer state in the parameter's dtype). float32 is the classic "fp32 master
  weights" recipe; bfloat16 halves weight, gradient and optimizer memory but rounds away updates
  smaller than 2^-8 of a weight (bf16 has 8 mantissa bits), so it trains a little worse.
- ``fp32_norms``: norm layers run with autocast off on float32 inputs and keep float32 gains,
  whatever the other choices; their output returns to the input's dtype. The mean and variance
  of a row are sums of many terms, which bf16's 8-bit mantissa rounds badly.

Always float32, by the models' own code: the loss (``lm_loss`` upcasts the logits), softmax
statistics (SDPA kernels accumulate in float32; the reference path upcasts), RMSNorm statistics.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from lmzoo.layers.norm import LayerNorm, RMSNorm


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context for ``dtype`` on ``device`` (a no-op context for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def setup_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa inputs,
    float32 accumulation): about 8x the float32 throughput on A100/H100 at a precision that
    training does not notice. No effect on other devices."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def is_norm(module: nn.Module) -> bool:
    """Norm layers of any family: the blocks' and final norms, and the norms inside layers (a
    BitLinear's, Jamba's inner SSM norms), lmzoo's or torch's."""
    torch_norms = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if t is not None)
    return isinstance(module, (*torch_norms, LayerNorm, RMSNorm))


def _fp32_forward(orig):
    def forward(self, x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            y = orig(self, x.float(), *args, **kwargs)
        return y.to(x.dtype)

    return forward


def apply_precision(model: nn.Module, param_dtype: torch.dtype, fp32_norms: bool = True) -> nn.Module:
    """Cast parameters (not buffers: RoPE tables stay float32) to ``param_dtype``; with
    ``fp32_norms``, norm layers keep float32 gains and compute in float32. In place; returns model."""
    norms = [m for m in model.modules() if is_norm(m)] if fp32_norms else []
    keep = {id(p) for m in norms for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in keep and p.dtype != param_dtype and p.is_floating_point():
            p.data = p.data.to(param_dtype)
    for m in norms:
        if not getattr(m, "_lmzoo_fp32", False):
            # an instance attribute: the class (and every other model) is untouched, keys unchanged
            m.forward = types.MethodType(_fp32_forward(type(m).forward), m)
            m._lmzoo_fp32 = True
    return model
