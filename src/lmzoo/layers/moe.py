"""Sparse mixture-of-experts MLP (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024).

A layer of ``n_experts`` independent MLPs ("experts") and a linear **router**. Each token is sent
to the ``top_k`` experts whose router logits are largest, and the layer's output is the sum of
their outputs weighted by a softmax over *those k logits only* (Mixtral):

    l = x W_r                                  router logits, (N, E)
    S = top-k indices of l                     (N, k)
    g = softmax(l[S])                          gates over the selected experts, (N, k)
    y = sum_j g_j * expert_{S_j}(x)

Only k of E experts run per token, so the parameters grow E-fold while the compute per token
grows k-fold (Mixtral 8x7B: 47B parameters, about 13B active).

**Dispatch without dropping tokens.** Switch-style layers give each expert a fixed capacity and
drop the overflow; here every (token, expert) assignment is computed ("capacity-free", as in
Mixtral and MegaBlocks). The N*k assignments are sorted by expert so each expert's tokens lie in
one contiguous slice, each expert runs one matmul chain on its slice (a Python loop over
*experts*, never over tokens), and the results are put back in assignment order and mixed with
the gates by one batched matmul. Nothing depends on the order of the tokens inside a batch.

**Load balancing.** Left alone, the router collapses onto a few experts. The Switch/Mixtral
auxiliary loss (the same as ``transformers``' ``load_balancing_loss_func`` for one layer) is

    L_balance = E * sum_i f_i * P_i

with f_i the fraction of tokens that picked expert i among their k (so sum_i f_i = k; it is
not differentiable) and P_i the mean router probability of expert i over the full softmax
(differentiable). Under uniform routing it equals k. The ST-MoE router z-loss (Zoph et al. 2022)
``mean(logsumexp(l)^2)`` keeps the logits small, which keeps the softmax stable in low precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.layers.mlp import make_mlp


class RouterStats(NamedTuple):
    """What one MoE layer reports besides its output (every field a tensor, for logging and losses)."""

    balance_loss: torch.Tensor  # scalar, E * sum_i f_i P_i (differentiable through P)
    z_loss: torch.Tensor  # scalar, mean(logsumexp(logits)^2) (differentiable)
    tokens_per_expert: torch.Tensor  # (E,) long: assignments each expert computed; sums to N * k
    router_entropy: torch.Tensor  # scalar, mean entropy (nats) of the full router softmax, detached


def load_balancing_loss(router_logits: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/Mixtral balance loss ``E * sum_i f_i * P_i`` (see the module docstring).

    router_logits (N, E); experts (N, k) the indices each token picked. Returns a float32 scalar.
    """
    N = router_logits.shape[0]
    f = torch.bincount(experts.reshape(-1), minlength=n_experts).float() / N  # (E,), sums to k
    P = F.softmax(router_logits.float(), dim=-1).mean(0)  # (E,), sums to 1
    return n_experts * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss ``mean_n logsumexp(l_n)^2``: penalizes large router logits. (N, E) -> scalar."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


class MoE(nn.Module):
    """Top-k routed mixture of ``n_experts`` MLPs; ``forward(x) -> (y, RouterStats)``.

    x (..., dim) -> y (..., dim). Each expert is the dense MLP ``expert`` names (``swiglu`` as in
    Mixtral, or ``gelu``/``gelu_tanh`` as in GPT-2), so a checkpoint's per-expert weights map 1:1
    onto ``experts.{e}``. The router has no bias (Mixtral's ``gate``). ``renormalize=False`` weights
    the k experts by their probabilities under the softmax over all E logits, not renormalized
    (Jamba; Switch with k = 1), instead of a softmax over the k selected logits (Mixtral).
    """

    # quantizers leave these in full precision (lmzoo.quant.quantizable_linears), for this reason
    keep_precise = {"router": "its few logits choose the experts: a quantized router changes which experts run"}

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_experts: int,
        top_k: int = 2,
        expert: str = "swiglu",
        bias: bool = False,
        dropout: float = 0.0,
        renormalize: bool = True,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..n_experts ({n_experts}), got {top_k}")
        self.n_experts, self.top_k = n_experts, top_k
        self.renormalize = renormalize
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(expert, dim, hidden, bias, dropout) for _ in range(n_experts))

    def inactive_params(self) -> int:
        """Parameters that a token does not use (the E - k experts it skips): for FLOP counts."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.n_experts - self.top_k) * per_expert

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C): batch and time are just tokens here
        N, C = x.shape
        E, k = self.n_experts, self.top_k

        logits = self.router(x)  # (N, E)
        top_logits, top_idx = logits.topk(k, dim=-1)  # (N, k)
        if self.renormalize:
            # softmax over the k selected logits = the full softmax renormalized over them (Mixtral)
            gates = F.softmax(top_logits.float(), dim=-1)  # (N, k), float32 like transformers
        else:  # the full softmax's probabilities of the k experts (Jamba): they sum to less than 1
            gates = F.softmax(logits.float(), dim=-1).gather(-1, top_idx)

        # Group the N*k assignments by expert: assignment a = token a // k, slot a % k.
        flat = top_idx.reshape(-1)  # (N*k,) expert of each assignment
        order = flat.argsort(stable=True)  # assignments sorted by expert
        counts = torch.bincount(flat, minlength=E)  # (E,) tokens per expert
        xs = x[order // k]  # (N*k, C): expert e's inputs are one contiguous slice
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # one host sync; then one matmul chain per expert
            if n:
                outs.append(self.experts[e](xs[start : start + n]))
            start += n
        ys = torch.cat(outs)  # (N*k, C) in sorted order
        ys = ys.new_empty(ys.shape).index_copy_(0, order, ys)  # back to assignment order
        y = torch.bmm(gates.to(ys.dtype).unsqueeze(1), ys.view(N, k, C))  # (N, 1, C): gate-weighted sum

        with torch.no_grad():
            probs = F.softmax(logits.float(), dim=-1)  # (N, E)
            entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()
        stats = RouterStats(
            balance_loss=load_balancing_loss(logits, top_idx, E),
            z_loss=router_z_loss(logits),
            tokens_per_expert=counts,
            router_entropy=entropy,
        )
        return y.view(shape), stats


def combine_router_stats(stats: Sequence[RouterStats]) -> dict[str, torch.Tensor]:
    """Per-layer stats -> the ``aux`` dict a model returns (losses averaged over the MoE layers).

    Keys: ``moe_balance`` and ``moe_z`` (scalars, differentiable), ``moe_entropy`` (scalar),
    ``moe_tokens_per_expert`` ((n_moe_layers, E) long). Averaging, not summing, keeps a loss
    weight meaningful whatever the depth.
    """
    return {
        "moe_balance": torch.stack([s.balance_loss for s in stats]).mean(),
        "moe_z": torch.stack([s.z_loss for s in stats]).mean(),
        "moe_entropy": torch.stack([s.router_entropy for s in stats]).mean(),
        "moe_tokens_per_expert": torch.stack([s.tokens_per_expert for s in stats]),
    }


def add_router_losses(
    loss: torch.Tensor, aux: dict[str, torch.Tensor], balance_weight: float, z_weight: float
) -> torch.Tensor:
    """The training objective: ``loss + balance_weight * moe_balance + z_weight * moe_z``."""
    loss = loss + balance_weight * aux["moe_balance"]
    if z_weight:
        loss = loss + z_weight * aux["moe_z"]
    return loss


def loggable(aux: dict[str, torch.Tensor] | None) -> dict[str, float | list]:
    """``aux`` as plain numbers for a metrics log: scalars -> float, tensors -> nested lists."""
    if not aux:
        return {}
    return {k: (v.item() if v.numel() == 1 else v.tolist()) for k, v in aux.items()}
