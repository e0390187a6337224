"""The selective state-space layer of Mamba (Gu & Dao 2023), with three scans that compute one function.

**The state-space model.** A continuous linear system maps an input signal x(t) to y(t) through a
hidden state h(t) of N numbers per channel:

    h'(t) = A h(t) + B x(t),        y(t) = C h(t) + D x(t)

**Discretization (zero-order hold).** Holding x constant over a step of length Δ gives the exact
update h_t = exp(ΔA) h_{t-1} + (ΔA)^{-1}(exp(ΔA) - I) ΔB x_t. With A diagonal (S4D, one decay per
channel and state) this is elementwise; like the paper's implementation we keep Ā = exp(ΔA) exact
and take the first-order B̄ = ΔB (the two agree to O(Δ²)):

    h_t = Ā_t ⊙ h_{t-1} + Δ_t B_t x_t,        y_t = C_t · h_t + D x_t

**Selectivity.** S4 uses fixed Δ, B, C (a convolution over time). Mamba makes them functions of
the input: Δ_t = softplus(W_Δ x_t), B_t = W_B x_t, C_t = W_C x_t. A large Δ_t resets the state
towards the current token, a small one ignores the token: content-based forgetting that a fixed
convolution cannot express. A = -exp(A_log) stays input-independent and negative (a decay).

**The block.** in_proj -> (x, z); x -> depthwise causal conv1d -> SiLU -> the SSM above; the
output is gated by SiLU(z) and projected back (out_proj). Shapes: B batch, T time, d = d_inner
= expand * d_model channels, N = d_state.

**Three scans, one function** (tests check they agree):

- :func:`selective_scan_ref`: the recurrence one step at a time under autograd (readable).
- :func:`selective_scan`: a chunked parallel scan (see :class:`_ChunkedScan`): the steps
  h -> a_t h + b_t compose associatively, so a sequence can be cut into chunks that are scanned all
  at once, joined by their end states, and completed, in O(T) work and O(T / chunk + chunk)
  sequential steps. An autograd Function keeps only the inputs and one state per segment, and
  backward recomputes a segment at a time: memory is linear in T with a small constant, never
  (B, T, d, N) at once.
- :func:`selective_scan_step`: one token, the state carried in the decoding cache.

Where ``mamba_ssm``'s CUDA kernel is importable and the tensors are on a GPU, training uses it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.layers.norm import RMSNorm

try:  # optional: the fused CUDA kernel from the authors' package
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except Exception:  # not installed, or installed without a working CUDA build
    _cuda_selective_scan = None


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one token at a time (the reference the fast scans are tested against).

    u, delta (B, T, d); A (d, N); B, C (B, T, N); h0 (B, d, N) or None (zeros).
    Returns y (B, T, d) = C_t · h_t (without the D skip) and the last state h_T (B, d, N), float32.
    """
    h = h0.float() if h0 is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float32)
    ys = []
    # unbind (not u[:, t]) so that backward stacks the T gradients once instead of T full-size copies
    for u_t, dt_t, B_t, C_t in zip(u.float().unbind(1), delta.float().unbind(1), B.float().unbind(1),
                                   C.float().unbind(1)):
        dA = torch.exp(dt_t[:, :, None] * A)  # Ā = exp(ΔA): (B, d, N)
        dBx = (dt_t * u_t)[:, :, None] * B_t[:, None, :]  # B̄x = ΔBx: (B, d, N)
        h = dA * h + dBx
        ys.append((h * C_t[:, None, :]).sum(-1))  # C·h: (B, d)
    return torch.stack(ys, 1), h


def selective_scan_step(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """One decoding step: u, delta (B, d); B, C (B, N); h (B, d, N) float32, updated in place.

    Returns y (B, d) = C · h (without the D skip). Cost per token is constant: no history is kept.
    """
    dA = torch.exp(delta.float()[:, :, None] * A)
    h.mul_(dA).add_((delta * u).float()[:, :, None] * B.float()[:, None, :])
    return (h * C.float()[:, None, :]).sum(-1)


def _chunked_scan_(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, chunk: int, reverse: bool = False
) -> None:
    """In place: x_t <- a_t ⊙ x_{t-1} + x_t along dim 0 with x_{-1} = h0 (reverse: x_{t+1}, x_L = h0).

    a, x (L, B, d, N), time first, with L a multiple of ``chunk``. The linear recurrence is a scan
    with the associative operator (a, b) ∘ (a', b') = (a a', a' b + b'), so it splits into chunks:

    1. reduce: every chunk scanned from a zero state at once (``chunk`` steps over all chunks),
       keeping only its end state e_i and its total decay p_i = prod a_t;
    2. propagate: the state entering chunk i is s_i = p_{i-1} s_{i-1} + e_{i-1} (L/chunk small steps);
    3. scan every chunk again, at once, from s_i, writing the states.

    O(L) work, O(chunk + L/chunk) steps, each step one vectorized op over all chunks.
    """
    m = x.shape[0] // chunk
    av, xv = a.unflatten(0, (m, chunk)), x.unflatten(0, (m, chunk))  # (m, chunk, B, d, N) views
    order = list(range(chunk - 1, -1, -1) if reverse else range(chunk))
    if m == 1:
        enter = h0[None]
    else:
        end, decay = xv[:, order[0]].clone(), av[:, order[0]].clone()  # (m, B, d, N)
        for j in order[1:]:
            torch.addcmul(xv[:, j], av[:, j], end, out=end)
            decay.mul_(av[:, j])
        enter, h = torch.empty_like(end), h0
        for i in range(m - 1, -1, -1) if reverse else range(m):
            enter[i] = h
            h = torch.addcmul(end[i], decay[i], h)
    prev = enter
    for j in order:
        xv[:, j].addcmul_(av[:, j], prev)
        prev = xv[:, j]


def _segment_states(delta, du, A, B, h_in, a, h, chunk) -> None:
    """One segment, time first: a[:L] = Ā = exp(ΔA); h[0] = h_in and h[1:L+1] = the L states.

    delta, du (L, B, d) and B (L, B, N) may be strided views; the buffers a (Lp, B, d, N) and h
    (Lp + 1, B, d, N) are padded to whole chunks, with steps that keep the state: Ā = 1, B̄x = 0.
    """
    L = delta.shape[0]
    torch.mul(delta[..., None], A, out=a[:L]).exp_()
    torch.mul(du[..., None], B[:, :, None, :], out=h[1 : L + 1])  # B̄x = (Δx) ⊗ B
    a[L:] = 1.0
    h[L + 1 :] = 0.0
    h[0] = h_in
    _chunked_scan_(a, h[1:], h_in, chunk)


def _segments(T: int, chunk: int, segment: int) -> list[tuple[slice, int]]:
    """(time slice, buffer length padded to whole chunks) of each segment of a length-T sequence."""
    seg = min(segment, -(-T // chunk) * chunk)
    return [(slice(s, min(s + seg, T)), -(-(min(s + seg, T) - s) // chunk) * chunk) for s in range(0, T, seg)]


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t · h_t with h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t x_t B_t, memory-bounded.

    Forward walks the sequence in segments of ``segment`` tokens, each computed with
    :func:`_chunked_scan_`, and saves only the inputs (B, T, d or N) and the state entering each
    segment. Backward walks the segments in reverse: it recomputes a segment's Ā and states, then
    runs the adjoint recurrence, which is the same scan backwards in time,

        g_t = C_t dy_t + Ā_{t+1} ⊙ g_{t+1}          (g_t = dLoss/dh_t)

    from which every gradient is a local product: dΔ_t = Σ_N g_t ⊙ (A Ā_t h_{t-1} + x_t B_t),
    dA = Σ_{b,t} Δ_t g_t ⊙ Ā_t ⊙ h_{t-1}, dx_t = Δ_t Σ_N g_t B_t, dB_t = Σ_d g_t Δ_t x_t,
    dC_t = Σ_d dy_t h_t, dh0 = Ā_0 ⊙ g_0. Working memory is a few (segment, B, d, N) buffers.
    The buffers are time-first, (T, B, ...), so a time step is one contiguous block; inputs and
    outputs stay batch-first and are read and written through transposed views (no copies).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk: int, segment: int):
        b, T, d = u.shape
        n = A.shape[1]
        segs = _segments(T, chunk, segment)
        ut, dt, Bt, Ct = (t.transpose(0, 1) for t in (u, delta, B, C))  # time-first views
        seg = segs[0][1]  # the longest segment's buffer length
        du = u.new_empty(seg, b, d)  # Δx of one segment, time-first and contiguous
        y = u.new_empty(b, T, d)
        yt = y.transpose(0, 1)
        a = u.new_empty(seg, b, d, n)
        h = u.new_empty(seg + 1, b, d, n)  # h[0] is the state entering the segment
        starts = []
        state = h0 if h0 is not None else u.new_zeros(b, d, n)
        for sl, Lp in segs:
            L = sl.stop - sl.start
            starts.append(state)
            _segment_states(dt[sl], torch.mul(dt[sl], ut[sl], out=du[:L]), A, Bt[sl], state, a[:Lp],
                            h[: Lp + 1], chunk)
            # Σ_N C h as multiply-then-sum into a's buffer (a is done with): matmul would run a
            # batch of (d × N) @ (N × 1) products, about twice as slow on CPU
            torch.sum(torch.mul(h[1 : L + 1], Ct[sl, :, None, :], out=a[:L]), -1, out=yt[sl])
            state = h[L].clone()
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        ctx.sizes = (chunk, segment)
        ctx.has_h0 = h0 is not None
        return y, state

    @staticmethod
    def backward(ctx, gy, g_last):
        u, delta, A, B, C, starts = ctx.saved_tensors
        chunk, segment = ctx.sizes
        b, T, d = u.shape
        n = A.shape[1]
        segs = _segments(T, chunk, segment)
        ut, dt, Bt, Ct, gyt = (t.transpose(0, 1) for t in (u, delta, B, C, gy))  # time-first views
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gB, gC, gA = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
        gut, gdt, gBt, gCt = (t.transpose(0, 1) for t in (gu, gdelta, gB, gC))
        seg = segs[0][1]
        a = u.new_empty(seg + 1, b, d, n)  # a[Lp] = 1: the reverse scan reads Ā_{t+1} as a[1:Lp+1]
        h = u.new_empty(seg + 1, b, d, n)
        g = u.new_empty(seg, b, d, n)
        tmp = u.new_empty(seg, b, d, n)  # products reduced over N or over (time, batch)
        du, gys = u.new_empty(seg, b, d), u.new_empty(seg, b, d)  # contiguous, for the matmuls
        zero = u.new_zeros(b, d, n)
        carry = g_last if g_last is not None else zero  # dLoss/d(state leaving the segment)
        for k in range(len(segs) - 1, -1, -1):
            sl, Lp = segs[k]
            L = sl.stop - sl.start
            dus, gyk = torch.mul(dt[sl], ut[sl], out=du[:L]), gys[:L].copy_(gyt[sl])
            _segment_states(dt[sl], dus, A, Bt[sl], starts[k], a[:Lp], h[: Lp + 1], chunk)
            gCt[sl] = torch.matmul(gyk[:, :, None, :], h[1 : L + 1]).squeeze(2)  # Σ_d dy h
            gk = g[:Lp]
            torch.mul(gyk[..., None], Ct[sl, :, None, :], out=gk[:L])  # C_t dy_t
            gk[L:] = 0.0
            gk[Lp - 1] += carry
            a[Lp] = 1.0
            _chunked_scan_(a[1 : Lp + 1], gk, zero, chunk, reverse=True)  # g_t = C_t dy_t + Ā_{t+1} g_{t+1}
            gk, t = gk[:L], tmp[:L]
            gBt[sl] = torch.matmul(dus[:, :, None, :], gk).squeeze(2)  # Σ_d g Δx
            # the reductions over N (and over time and batch for dA) are multiply-then-sum into a
            # reused buffer: as batched matmuls they would be batches of tiny products (or batched
            # over d, in a transposed layout), several times slower on CPU
            gBx = torch.mul(gk, Bt[sl, :, None, :], out=t).sum(-1)  # Σ_N g B: (L, B, d)
            gz = h[:L].mul_(gk).mul_(a[:L])  # g ⊙ h_{t-1} ⊙ Ā = dLoss/d(ΔA), in place of h_{t-1}
            torch.sum(torch.mul(gz, A, out=t), -1, out=gdt[sl]).addcmul_(gBx, ut[sl])
            gA += torch.mul(gz, dt[sl, :, :, None], out=t).sum((0, 1))
            torch.mul(gBx, dt[sl], out=gut[sl])
            carry = a[0] * gk[0]  # dLoss/d(state entering the segment)
        gh0 = carry if ctx.has_h0 else None
        return gu, gdelta, gA, gB, gC, gh0, None, None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    chunk: int = 8,
    segment: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked parallel scan; same contract as :func:`selective_scan_ref` (float32 out).

    ``chunk`` tokens are scanned sequentially inside each chunk while all chunks advance together;
    ``segment`` (a multiple of ``chunk``) bounds the working memory to O(B * segment * d * N).
    """
    if segment % chunk:
        raise ValueError(f"segment ({segment}) must be a multiple of chunk ({chunk})")
    f = torch.float32
    return _ChunkedScan.apply(u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f),
                              None if h0 is None else h0.to(f), chunk, segment)


class SelectiveSSM(nn.Module):
    """Mamba's mixer: x (B, T, d_model) -> (B, T, d_model). Parameter names follow the checkpoints.

    ``inner_norms`` adds Jamba's RMSNorms on Δ (before dt_proj), B and C. ``scan`` picks the
    training scan: ``"chunked"`` (default) or ``"sequential"`` (the reference, for tests).

    Decoding state (``cache``, a :class:`~lmzoo.cache.MambaCache`): ``cache.conv[layer]`` (B,
    d_conv - 1, d) holds the last inputs of the convolution and ``cache.ssm[layer]`` (B, d, N) the SSM
    state. Left-padded rows (``cache.real_tokens``) have their padding zeroed before the convolution
    and before the SSM, so the padding never reaches the state: each row computes what it would alone.
    """

    # quantizers leave these in full precision (lmzoo.quant.quantizable_linears): binarized Mamba
    # (Bi-Mamba, Tang et al. 2024) quantizes in_proj and out_proj and keeps the selective projections
    keep_precise = {
        "x_proj": "it computes the input-dependent Δ, B and C of the selective scan (small, and sensitive)",
        "dt_proj": "it sets each channel's time step Δ through a softplus (small, and sensitive)",
    }

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        conv_bias: bool = True,
        bias: bool = False,
        inner_norms: bool = False,
        norm_eps: float = 1e-6,
        scan: Literal["chunked", "sequential"] = "chunked",
        chunk: int = 8,
        segment: int = 32,
    ):
        super().__init__()
        self.d_inner = d_inner = expand * d_model
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan, self.chunk, self.segment = scan, chunk, segment
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)  # -> (Δ low-rank, B, C)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.inner_norms = inner_norms
        if inner_norms:
            self.dt_norm = RMSNorm(self.dt_rank, norm_eps)
            self.B_norm = RMSNorm(d_state, norm_eps)
            self.C_norm = RMSNorm(d_state, norm_eps)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(
        self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4, dt_scale: float = 1.0
    ) -> None:
        """Mamba's initialization of the SSM parameters (mamba_simple.py).

        A = -(1, 2, ..., N) for every channel (S4D-real); D = 1; dt_proj's bias = softplus^-1(Δ0)
        with Δ0 log-uniform in [dt_min, dt_max], so the initial time scales span two decades;
        dt_proj.weight uniform(±dt_rank^-0.5 * dt_scale).
        """
        if self.A_log.is_meta:
            return
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(self.d_inner, device=self.D.device) * (hi - lo) + lo).clamp_min(dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt) = dt + log(1 - e^-dt)

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); with ``cache``, x holds the next T tokens."""
        Bsz, T, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d) each: the SSM branch and the gate
        real = cache.real_tokens(T) if cache is not None else None  # (B, T) bool, or None: no padding
        if real is not None:
            xs = xs * real[..., None]
        # depthwise causal convolution over time, a short local mixing before the long-range SSM,
        # written as d_conv shifted multiply-adds: the same function as the Conv1d, whose depthwise
        # backward is very slow on CPU
        K = self.d_conv
        if cache is None:
            past = xs.new_zeros(Bsz, K - 1, self.d_inner)
        else:
            state = cache.conv[layer]  # (B, d_conv - 1, d): the previous inputs
            past = state.to(xs.dtype)
        full = torch.cat([past, xs], dim=1)  # (B, d_conv - 1 + T, d)
        if cache is not None:
            state.copy_(full[:, full.shape[1] - (K - 1) :])
        w = self.conv1d.weight[:, 0].t()  # (d_conv, d): tap k multiplies the input k - d_conv + 1 steps back
        xs = full[:, K - 1 :] * w[K - 1]
        if self.conv1d.bias is not None:
            xs = xs + self.conv1d.bias
        for k in range(K - 1):
            xs = torch.addcmul(xs, full[:, k : k + T], w[k])
        u = F.silu(xs)  # (B, T, d)
        if real is not None:
            u = u * real[..., None]  # zero input: the state stays exactly 0 through the padding
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, Bm, Cm = self.dt_norm(dt), self.B_norm(Bm), self.C_norm(Cm)
        delta = F.softplus(self.dt_proj(dt).float())  # (B, T, d) > 0: the selective step size
        A = -torch.exp(self.A_log.float())  # (d, N) < 0
        if cache is not None and T == 1:
            y = selective_scan_step(u[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0], cache.ssm[layer])[:, None]
        elif cache is not None:
            y, h = selective_scan(u, delta, A, Bm, Cm, cache.ssm[layer], self.chunk, self.segment)
            cache.ssm[layer].copy_(h)
        elif self.scan == "sequential":
            y, _ = selective_scan_ref(u, delta, A, Bm, Cm)
        elif _cuda_selective_scan is not None and u.is_cuda:
            # the authors' fused kernel: layout (B, d, T) and (B, N, T); untested here (no GPU in CI)
            y = _cuda_selective_scan(u.float().transpose(1, 2), delta.transpose(1, 2), A,
                                     Bm.float().transpose(1, 2), Cm.float().transpose(1, 2)).transpose(1, 2)
        else:
            y, _ = selective_scan(u, delta, A, Bm, Cm, None, self.chunk, self.segment)
        y = (y + u.float() * self.D.float()) * F.silu(z.float())  # D skip, then the SiLU gate
        return self.out_proj(y.to(x.dtype))
