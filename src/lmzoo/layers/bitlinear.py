"""BitNet's BitLinear: 1-bit (Wang et al. 2023) and 1.58-bit (Ma et al. 2024) linear layers.

A BitLinear keeps a full-precision *latent* weight ``W`` for the optimizer, but every forward
pass multiplies with a quantized copy of it and with 8-bit activations:

    h      = RMSNorm(x)                                  the paper's "LN before quantization" (SubLN)
    x_int  = clip(round(h * 127 / gamma_x), -128, 127)   gamma_x = max |h| per token (absmax)
    b1:    W_q = sign(W - mean(W))  in {-1, +1}          scale s_w = beta  = mean |W|
    b1.58: W_q = clip(round(W / gamma), -1, 1) in {-1, 0, +1}   scale s_w = gamma = mean |W| (absmean)
    y      = (x_int @ W_q^T) * s_w * gamma_x / 127 + bias

``round`` and ``sign`` have zero gradient almost everywhere, so training uses the straight-through
estimator (Bengio et al. 2013): the forward uses the quantized values, the backward pretends the
quantizer was the identity (``w + (q(w) - w).detach()``). Both variants use per-token absmax
activations with Q = 127 as in the released b1.58 code (the 1-bit paper also allows per-tensor
scaling); the 1-bit paper's ``sign`` maps exact zeros to +1 here so the weight stays binary.

Inference never needs the latent weight: :class:`PackedBitLinear` stores the codes 2 bits per value
(4 per byte, 1/8 of bf16) and :func:`packed_matmul` unpacks one block of rows at a time. With
integer-valued activations and weights the float32 matmul is exact (every partial sum is an
integer below 2^24 while ``in_features * 128 < 2^24``), so the packed and unpacked layers give
bit-identical outputs in inference.

Cached decoding and the full forward agree only up to the quantizer's steps. The two paths compute a
layer's input up to float32 rounding (attention sums in another order), and ``round`` is a step
function: an activation whose unrounded code ``h * 127 / gamma_x`` lies within that rounding of a .5
tie can round up in one path and down in the other. Such a flip changes the layer's output by
``s_w * gamma_x / 127`` per flipped code, and every later layer sees the change, so logits can differ by
far more than float32 noise on the inputs where a tie occurs. No ordering of the arithmetic removes
ties; a float64 model gives the two paths the same codes (tests/test_bitnet.py checks both: the first
layer whose codes differ differs only at ties, by one step; float64 agrees to 1e-12).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.layers.norm import RMSNorm

Variant = Literal["b1", "b1.58"]
VARIANTS: tuple[str, ...] = ("b1", "b1.58")
ACT_QMAX = 127  # 8-bit activations: x_int in [-128, 127]
_EPS = 1e-5


def activation_quant(x: torch.Tensor, qmax: int = ACT_QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantization. x (..., C) -> (x_int (..., C) float32 with integer values, scale (..., 1)).

    ``x ~= x_int / scale``; computed in float32 whatever the input dtype.
    """
    xf = x.float()
    scale = qmax / xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    return (xf * scale).round().clamp(-qmax - 1, qmax), scale


def weight_quant(w: torch.Tensor, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (codes (out, in) float32 in {-1, 0, 1}, scale () float32) with ``w ~= codes * scale``."""
    wf = w.float()
    scale = wf.abs().mean().clamp_min(_EPS)  # beta (b1) or gamma (b1.58): both mean |W|
    if variant == "b1.58":
        codes = (wf / scale).round().clamp(-1, 1)  # RoundClip
    elif variant == "b1":
        codes = torch.where(wf >= wf.mean(), 1.0, -1.0)  # sign of the centred weight
    else:
        raise ValueError(f"unknown BitNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return codes, scale


def _int_linear(x_int: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x_int (..., in) @ codes (out, in)^T in float32 with autocast off: exact integer arithmetic."""
    with torch.autocast(x_int.device.type, enabled=False):
        return F.linear(x_int, codes.float())


class BitLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with quantized weights and 8-bit activations.

    x (..., in_features) -> (..., out_features). ``weight`` (out, in) is the latent full-precision
    weight; ``norm`` (RMSNorm with a learned gain) normalizes the input before quantization.
    With gradients enabled the forward is the STE form; without (inference) it is the integer form,
    identical to :class:`PackedBitLinear`.
    """

    rewrite = "bitnet"  # what stands in a Linear's place (formats.hf.check_exportable reads it)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        variant: Variant = "b1.58",
        norm: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown BitNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.in_features, self.out_features, self.variant = in_features, out_features, variant
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.norm = RMSNorm(in_features, eps=1e-5).to(**kw) if norm else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    @classmethod
    def from_linear(cls, linear: nn.Linear, variant: Variant = "b1.58", norm: bool = True) -> BitLinear:
        """A BitLinear sharing ``linear``'s weight and bias Parameters (no copy: works on meta too)."""
        w = linear.weight
        # built on the meta device (no memory), then given the Linear's own Parameters and a real norm
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, variant, False, device="meta")
        m.weight, m.bias = linear.weight, linear.bias
        if norm:
            m.norm = RMSNorm(linear.in_features, eps=1e-5).to(device=w.device, dtype=w.dtype)
        return m

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (out, in) in {-1, 0, 1}, scale ()) of the current latent weight."""
        return weight_quant(self.weight, self.variant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else x
        x_int, sx = activation_quant(h)
        codes, sw = self.quantized_weight()
        if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            # straight-through: values of the quantized operands, gradients of the identity
            xq = (x_int / sx).to(h.dtype)
            wq = (codes * sw).to(self.weight.dtype)
            xq = h + (xq - h).detach()
            wq = self.weight + (wq - self.weight).detach()
            y = F.linear(xq, wq)
        else:
            y = (_int_linear(x_int, codes) * (sw / sx)).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, variant={self.variant}, norm={self.norm is not None}")


# --- 2-bit packing ----------------------------------------------------------------------------
# A code c in {-1, 0, 1} is stored as c + 1 in {0, 1, 2}, four codes per byte along the input
# dimension (code j of a byte in bits 2j..2j+1). The 1-bit variant uses the same format (its codes
# are a subset), trading a factor 2 of memory for one inference path.

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """codes (out, in) with values in {-1, 0, 1} -> uint8 (out, ceil(in / 4))."""
    out, n = codes.shape
    pad = (-n) % 4
    c = (codes.round().to(torch.int16) + 1).to(torch.uint8)
    if pad:
        c = F.pad(c, (0, pad), value=1)  # padding codes decode to 0: they add nothing
    c = c.view(out, -1, 4) << _SHIFTS.to(c.device)
    return c[..., 0] | c[..., 1] | c[..., 2] | c[..., 3]


def unpack_ternary(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (rows, ceil(in / 4)) -> codes (rows, in_features) in {-1, 0, 1} of ``dtype``."""
    c = (packed[..., None] >> _SHIFTS.to(packed.device)) & 3  # (rows, in/4, 4)
    return (c.reshape(packed.shape[0], -1)[:, :in_features].to(dtype)) - 1


def packed_matmul(x_int: torch.Tensor, packed: torch.Tensor, in_features: int, block_rows: int = 256) -> torch.Tensor:
    """x_int (..., in) @ unpack(packed)^T -> (..., out), unpacking ``block_rows`` weight rows at a time.

    Only one block of unpacked weights exists at any moment; the result is exact (integer sums).
    """
    out_features = packed.shape[0]
    y = x_int.new_empty(*x_int.shape[:-1], out_features, dtype=torch.float32)
    for r0 in range(0, out_features, block_rows):
        w = unpack_ternary(packed[r0 : r0 + block_rows], in_features)  # (rb, in) float32
        y[..., r0 : r0 + w.shape[0]] = _int_linear(x_int, w)
    return y


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear: codes packed 2 bits per value, one float32 weight scale.

    x (..., in_features) -> (..., out_features), equal to :class:`BitLinear` in inference.
    Buffers: ``packed`` uint8 (out, ceil(in / 4)), ``weight_scale`` float32 ().
    """

    rewrite = "bitnet"  # what stands in a Linear's place

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        norm: bool = True,
        block_rows: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.block_rows = in_features, out_features, block_rows
        self.register_buffer("packed", torch.ones(out_features, (in_features + 3) // 4, dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.norm = RMSNorm(in_features, eps=1e-5).to(device=device, dtype=dtype) if norm else None

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, m: BitLinear, block_rows: int = 256) -> PackedBitLinear:
        w = m.weight
        p = cls(m.in_features, m.out_features, m.bias is not None, m.norm is not None, block_rows,
                device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            codes, scale = m.quantized_weight()
            p.packed.copy_(pack_ternary(codes))
            p.weight_scale.copy_(scale)
        if m.bias is not None:
            p.bias = m.bias
        if m.norm is not None:
            p.norm = m.norm
        return p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else x
        x_int, sx = activation_quant(h)
        y = packed_matmul(x_int, self.packed, self.in_features, self.block_rows)
        y = (y * (self.weight_scale / sx)).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def packed_params(self) -> int:
        """The ternary weights the 2-bit buffer stands for (LanguageModel.num_params counts them)."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed=2bit")


def packed_weight_bytes(in_features: int, out_features: int) -> int:
    """Bytes of a packed weight: ``out * ceil(in / 4)`` codes plus the float32 scale."""
    return out_features * ((in_features + 3) // 4) + 4
