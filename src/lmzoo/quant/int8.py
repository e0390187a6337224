"""Int8 weight-only quantization for decoding on a CPU: fewer bytes read per token.

**Why weights only.** At batch 1 a decode step multiplies every weight matrix by one vector: each
weight is read once and used for one multiply-add, so the step's time is bounded by the bytes of the
weights over the memory bandwidth, not by arithmetic. Storing the weights in 8 bits reads 4x fewer
bytes than float32 (2x fewer than bfloat16); the activations stay in floating point (no
activation-quantization error, no calibration).

**The code.** Symmetric, one scale per output row (per channel)::

    s_o = max_i |W[o, i]| / 127          q[o, i] = round(W[o, i] / s_o)  in [-127, 127]
    y = x @ W^T  ~=  (x @ q^T) * s        (the scale factors out of each row's dot product)

so the rounding error of a weight is at most ``s_o / 2``, about 0.4% of its row's largest weight.

**The kernel.** :func:`torch.ops.aten._weight_int8pack_mm` (PyTorch's CPU kernel for exactly this
product: ``x (M, K)`` float, ``q (N, K)`` int8, ``s (N,)`` -> ``(M, N)``, converting the int8 weights
in registers, never writing a float copy). It takes the activations in ``compute_dtype`` (bfloat16
by default: on CPUs without AVX-512 its float32 path is several times slower than its bfloat16 one);
the layer casts its input to it and the output back, so the rest of the model keeps its dtype.
Where the kernel is missing (other devices), the forward dequantizes and calls ``F.linear``.

:func:`quantize_model` converts a model from outside: the blocks' mixer and feed-forward linears
(:func:`lmzoo.quant.quantizable_linears`, the rule every quantizer shares) and, with ``head=True``,
the output head (a large share of a small model's bytes: SmolLM2-135M's tied 49,152 x 576 head is 21%
of its weights; a tied embedding keeps its float table for the lookup, which reads one row per token).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.errors import ConfigError
from lmzoo.quant import check_linear_names, quantizable_linears

QMAX = 127  # symmetric: -127..127 (-128 unused, so that q and -q are both representable)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) float -> ``(q int8 (N, K), scale float32 (N,))`` with ``w ~= q * scale[:, None]``."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / QMAX
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale


def _has_kernel(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A frozen linear layer whose weight (out, in) is stored as int8 with one float scale per row.

    Buffers: ``qweight`` int8 (out, in), ``scale`` (out,) in ``compute_dtype``; ``bias`` (out,) float32
    or None. Forward ``(..., in) -> (..., out)`` in the input's dtype.
    """

    rewrite = "int8"  # what stands in a Linear's place (formats.hf.check_exportable reads it)

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(compute_dtype))
        bias = linear.bias
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None

    def packed_params(self) -> int:
        """The weights the int8 buffer stands for (LanguageModel.num_params counts them)."""
        return self.in_features * self.out_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) as ``q * scale`` in ``dtype``."""
        return (self.qweight.float() * self.scale.float()[:, None]).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _has_kernel(x.device):
            x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, K): the kernel's 2-D input
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y + self.bias.to(x.dtype) if self.bias is not None else y
        w = self.dequantize(x.dtype)  # no kernel here: a float copy for this product only
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: int8 values and the per-row scales."""
        return self.qweight.numel() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-row, compute={self.compute_dtype}"


def _targets(model: nn.Module, head: bool) -> list[str]:
    names = quantizable_linears(model, "int8")
    if head and isinstance(getattr(model, "head", None), nn.Linear):
        names.append("head")
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, head: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                   modules: list[str] | None = None) -> list[str]:
    """Replace the chosen linear layers of ``model`` by :class:`Int8Linear`, in place (inference: the
    model is frozen). ``modules`` None: the blocks' quantizable linears and, with ``head``, the head.
    Records ``model.quantization`` (saved with a checkpoint, re-applied by :func:`apply_spec`).
    Returns the names replaced; ConfigError when the model is already quantized."""
    if getattr(model, "quantization", None) or getattr(model, "nf4", None):
        method = (getattr(model, "quantization", None) or {}).get("method", "nf4")
        raise ConfigError(f"int8: the model is already quantized ({method})")
    names = check_linear_names(model, modules) if modules is not None else _targets(model, head)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Int8Linear(model.get_submodule(name), compute_dtype))
    model.quantization = {"method": "int8", "modules": names,
                          "compute_dtype": str(compute_dtype).removeprefix("torch.")}
    return names


def apply_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Rebuild the Int8Linear layers a saved ``model.quantization`` spec names (before its weights load);
    ConfigError naming the first malformed field."""
    name = spec.get("compute_dtype", "bfloat16")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"compute_dtype={name!r}: expected a floating-point torch dtype name")
    quantize_model(model, compute_dtype=dtype, modules=check_linear_names(model, spec.get("modules")))
    return model

