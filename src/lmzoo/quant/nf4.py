"""4-bit NormalFloat (NF4) with double quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

**Why quantiles of a normal.** Pretrained weights are close to zero-mean normal. After dividing a
block by its absolute maximum, the values lie in [-1, 1] with a (truncated) normal shape. A 4-bit code
has 16 levels; the code that wastes none of them puts an equal share of the probability mass in each
bin, i.e. its levels are *quantiles* of N(0, 1), rescaled to [-1, 1]. NF4 makes it asymmetric so
that 0 is exactly representable (padding, and exact zeros, stay zero): 8 positive quantiles and 7
negative ones of N(0,1), plus 0 (:func:`nf4_levels_from_normal` derives them; :data:`NF4_CODE` is the
published table of the paper / bitsandbytes, which they match to float32 precision).

**Blockwise absmax.** Each block of 64 consecutive weights (row-major, flattened) is divided by its own
absmax, so one outlier only costs precision inside its block. Each weight stores the 4-bit index of the
nearest level; two indices are packed per byte (first one in the high nibble, as bitsandbytes does).

**Double quantization.** A float32 absmax per 64 weights costs 32/64 = 0.5 bit per weight. QLoRA
quantizes those scales again: subtract their mean (they are all positive, centring them uses the
8-bit range on both sides), then blocks of 256 scales are stored in 8 bits with one float32 scale each:
8/64 + 32/(64*256) ~= 0.127 bit per weight. Total ~4.127 bits per weight, ~0.258x of bf16.

Here the second-level 8-bit code is a symmetric linear int8 (absmax) code; bitsandbytes uses its 8-bit
"dynamic" (tree) float code for the nested scales, so bitwise equality with bitsandbytes holds for the
4-bit indices and first-level dequantization given the same absmax, not for double-quantized scales.

Dequantization runs on the fly in :class:`NF4Linear`'s forward: ``W = code[idx] * absmax`` in the
compute dtype, then an ordinary matmul. Plain PyTorch: CPU and GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 levels as published (QLoRA appendix E; bitsandbytes `NF4` code), index 0..15.
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK = 64  # weights per absmax
BLOCK2 = 256  # absmax scales per second-level scale


def nf4_levels_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the 16 NF4 levels (float64): quantiles of N(0,1), normalized to [-1, 1].

    As in bitsandbytes' ``create_normal_map``: 8 positive levels at the quantiles of probabilities
    evenly spaced in [0.5, offset] (the 0.5 one, i.e. 0, dropped), 7 negative ones likewise, plus 0.
    ``offset`` = 1/2 (1/(2*15) + 1/(2*16)) ... keeps the outermost quantile finite (the paper's delta).
    """
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]
    v = torch.cat([torch.special.ndtri(p_pos), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(p_neg)])
    v = v.sort().values
    return v / v.abs().max()


def _code(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=dtype, device=device)


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """First level: any-shape ``w`` -> ``(indices uint8 (n_blocks, block), absmax float32 (n_blocks,))``.

    The flattened weight is zero-padded to a multiple of ``block``; each value maps to the nearest NF4
    level of ``w / absmax`` (ties go to the lower level).
    """
    flat = w.detach().reshape(-1).float()
    pad = (-flat.numel()) % block
    blocks = F.pad(flat, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = _code(w.device)
    # nearest level via the 15 midpoints between consecutive levels (a sorted search, no (N, 16) tensor)
    mids = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(normed, mids, right=False).to(torch.uint8)
    return idx, absmax


def pack(idx: torch.Tensor) -> torch.Tensor:
    """uint8 indices (..., even n) in 0..15 -> bytes (..., n/2): two per byte, first in the high nibble."""
    idx = idx.reshape(-1, 2)
    return (idx[:, 0] << 4) | idx[:, 1]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: bytes (m,) -> indices (2m,) uint8."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)


def quantize_absmax(absmax: torch.Tensor, block: int = BLOCK2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: float32 scales (n,) -> ``(int8 (n,), float32 scale per block (ceil(n/block),),
    float32 mean ())``. ``absmax ~= int8 / 127 * scale[block] + mean``."""
    mean = absmax.mean()
    c = absmax - mean
    pad = (-c.numel()) % block
    blocks = F.pad(c, (0, pad)).view(-1, block)
    scale = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(blocks / scale[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1)[: absmax.numel()], scale, mean


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, block: int = BLOCK2) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax` (float32 (n,))."""
    n = q.numel()
    pad = (-n) % block
    blocks = F.pad(q.float(), (0, pad)).view(-1, block) / 127 * scale[:, None]
    return blocks.reshape(-1)[:n] + mean


def dequantize_blocks(idx: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, dtype=torch.float32) -> torch.Tensor:
    """``code[idx] * absmax`` reshaped to ``shape`` (padding dropped)."""
    code = _code(idx.device, torch.float32)
    w = code[idx.long()].view(absmax.numel(), -1) * absmax[:, None]
    return w.reshape(-1)[: torch.Size(shape).numel()].view(shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight (out, in) is stored in NF4 with double-quantized scales.

    Buffers: ``packed`` uint8 (ceil(out*in/64)*32,), ``absmax_q`` int8 (n_blocks,), ``absmax_scale``
    float32 (ceil(n_blocks/256),), ``absmax_mean`` float32 (); ``bias`` (out,) kept in ``compute_dtype``.
    Forward ``(..., in) -> (..., out)`` dequantizes the weight to the input's dtype and multiplies.
    """

    rewrite = "nf4"  # what stands in a Linear's place (formats.hf.check_exportable reads it)

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.shape = torch.Size((self.out_features, self.in_features))
        self.double_quant = double_quant
        self.lora_dtype_hint = torch.float32  # adapters on top train in float32
        self.compute_dtype = compute_dtype
        idx, absmax = quantize_blocks(linear.weight)
        self.register_buffer("packed", pack(idx))
        if double_quant:
            q, scale, mean = quantize_absmax(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_mean", mean)
        else:
            self.register_buffer("absmax", absmax)
        bias = linear.bias
        self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False) if bias is not None else None

    def packed_params(self) -> int:
        """The weights the 4-bit buffers stand for (LanguageModel.num_params counts them)."""
        return self.in_features * self.out_features

    def scales(self) -> torch.Tensor:
        """The per-64 absmax scales (float32 (n_blocks,)), undoing double quantization."""
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_blocks(unpack(self.packed), self.scales(), self.shape, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(x.dtype)  # on the fly: the full-precision weight lives only during this matmul
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: packed indices + (double-quantized) scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, double_quant={self.double_quant}"


def compare_with_bitsandbytes(rows: int = 1024, cols: int = 768, seed: int = 0,
                              dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> dict:
    """lmzoo's NF4 against bitsandbytes' on the same weights, on CUDA (needs ``bitsandbytes`` and a GPU).

    Per dtype: ``pack_equal`` (the packed 4-bit indices of one normal weight, block 64, no double
    quantization), ``absmax_equal`` (the per-block scales), ``dequant_equal`` / ``dequant_max_abs_diff``
    (lmzoo's dequantization of bitsandbytes' own packed bytes and scales vs ``bf.dequantize_4bit``), and
    ``roundtrip_equal`` (lmzoo quantize -> dequantize vs bitsandbytes quantize -> dequantize). Raises
    ``RuntimeError`` naming what is missing. The double-quantized scales differ by design (module docs).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: bitsandbytes' NF4 kernels need one")
    try:
        import bitsandbytes
        import bitsandbytes.functional as bf
    except ImportError as e:
        raise RuntimeError(f"bitsandbytes is not installed ({e})") from None
    out: dict = {"bitsandbytes": bitsandbytes.__version__, "shape": [rows, cols], "block": BLOCK,
                 "device": torch.cuda.get_device_name()}
    g = torch.Generator(device="cuda").manual_seed(seed)
    w32 = torch.randn(rows, cols, device="cuda", generator=g) * 0.02
    for name in dtypes:
        w = w32.to(getattr(torch, name))
        packed, state = bf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
        ref = bf.dequantize_4bit(packed, state)
        idx, absmax = quantize_blocks(w)
        mine = dequantize_blocks(unpack(packed.reshape(-1)), state.absmax.float(), w.shape, w.dtype)
        out[name] = {
            "pack_equal": bool(torch.equal(pack(idx), packed.reshape(-1))),
            "absmax_equal": bool(torch.equal(absmax, state.absmax.float())),
            "dequant_equal": bool(torch.equal(mine, ref)),
            "dequant_max_abs_diff": float((mine.float() - ref.float()).abs().max()),
            "roundtrip_equal": bool(torch.equal(dequantize_blocks(idx, absmax, w.shape, w.dtype), ref)),
        }
    out["all_equal"] = all(v["pack_equal"] and v["dequant_equal"] and v["roundtrip_equal"]
                           for k, v in out.items() if k in dtypes)
    return out
