"""Muon: MomentUm Orthogonalized by Newton–Schulz (Jordan et al. 2024; Liu et al. 2025).

For a hidden weight matrix W (m, n) Muon keeps SGD momentum M of the gradient and steps along
the *orthogonalized* momentum, the matrix with the same singular vectors and every singular value
set to one::

    M <- mu M + G                       (Nesterov: U = G + mu M, else U = M)
    O  = NS5(U)  ~  U V^T  where U = U S V^T          (the polar factor)
    W <- W - lr (scale(m, n) O + wd W)

Why: the gradient of a linear layer is a sum of few outer products and its update is dominated by
a handful of directions (it is nearly low rank). Orthogonalizing gives the rare directions as
much step as the common ones: the steepest-descent step under the spectral norm (Bernstein &
Newhouse 2024). docs/muon.md has the argument and our measurements.

``NS5`` is five steps of the odd quintic X <- a X + b (X X^T) X + c (X X^T)^2 X with
(a, b, c) = (3.4445, -4.7750, 2.0315) (Jordan's coefficients, chosen for a steep slope at zero
rather than exact convergence). On each singular value it acts as f(s) = a s + b s^3 + c s^5:
starting from ``X = U / ||U||_F`` (all singular values in (0, 1]) every singular value at or above
about 0.05 of the Frobenius norm lands in [0.68, 1.21] after five steps (the band the tests check;
iterated further it settles in [0.68, 1.14]). Not exactly 1, and it does not need to be.

Shape-dependent scaling (``scale(m, n)``), two published choices:

- ``"moonlight"`` (Liu et al. 2025): ``0.2 * sqrt(max(m, n))`` makes the update's RMS about 0.2,
  that of a typical AdamW update, so Muon can share AdamW's learning rate and weight decay. The
  trainer sets one lr for all groups, which is why this is the default.
- ``"modded"`` (modded-nanogpt): ``max(1, m / n) ** 0.5``, with its own larger learning rate
  (``muon_lr_mult``, e.g. 0.02 / 0.0036 ~ 5.5 relative to the AdamW groups).

Only 2-D (or stacked 3-D, e.g. MoE experts) hidden weights use Muon. Embeddings, the output head,
norm gains and biases use AdamW inside the same optimizer: an embedding row is updated only when
its token occurs (orthogonalizing across rows makes no sense) and the head's rows are per-token
classifiers (Jordan et al. found AdamW better for both). Everything is one ``torch.optim.Optimizer``
so ``state_dict()``/``load_state_dict()`` carry both halves and the trainer's exact resume holds.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

NS_COEFFS = (3.4445, -4.7750, 2.0315)
SCALINGS = ("moonlight", "modded", "none")


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the polar factor of ``g`` (..., m, n): singular vectors kept, singular values ~1.

    ``dtype``: compute dtype (bfloat16 on GPUs, as in modded-nanogpt: the iteration is
    self-correcting, so low precision costs little; default float32). Works on the last two dims,
    so stacked matrices (experts, E, m, n) are orthogonalized one by one in a batch.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype or torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the short side: X X^T is (min, min), the cheap Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def update_scale(shape: torch.Size, scaling: str) -> float:
    """The factor multiplying the orthogonalized update of a (..., m, n) matrix (module docstring)."""
    m, n = shape[-2], shape[-1]
    if scaling == "moonlight":
        return 0.2 * math.sqrt(max(m, n))
    if scaling == "modded":
        return max(1.0, m / n) ** 0.5
    return 1.0


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others, in one optimizer.

    Group keys: ``lr``, ``weight_decay``, ``use_muon`` and, for Muon groups, ``momentum``,
    ``nesterov``, ``ns_steps``, ``scaling``; for AdamW groups ``betas``, ``eps``. ``lr_mult``
    (default 1) multiplies the lr the trainer writes into every group (the schedule stays shared).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        scaling: str = "moonlight",
        ns_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ) -> None:
        if scaling not in SCALINGS:
            raise ValueError(f"unknown Muon scaling {scaling!r}; choose from {', '.join(SCALINGS)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            scaling=scaling, betas=betas, eps=eps, use_muon=False, lr_mult=1.0,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"] * group["lr_mult"]
        mu, wd = group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            u = g.add(buf, alpha=mu) if group["nesterov"] else buf
            o = _orthogonalize(u, group["ns_steps"], self.ns_dtype)
            if wd:
                p.mul_(1.0 - lr * wd)  # decoupled decay (Moonlight found it needed at scale)
            p.add_(o, alpha=-lr * update_scale(p.shape, group["scaling"]))

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"] * group["lr_mult"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1.0 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            denom = (v / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                p.mul_(1.0 - lr * group["weight_decay"])
            p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**t))


def _orthogonalize(u: torch.Tensor, steps: int, dtype: torch.dtype | None) -> torch.Tensor:
    """NS5 of a plain tensor or of an FSDP2/TP-sharded DTensor (gathered, orthogonalized, re-sharded).

    Orthogonalization needs the whole matrix: a shard's polar factor is not the shard of the
    matrix's polar factor. Every rank computes the same full result and keeps its own shard, which
    is what "Muon is Scalable" does (they distribute the work; we keep it simple and redundant).
    """
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = None  # noqa: N806
    if DTensor is not None and isinstance(u, DTensor):
        full = newton_schulz(u.full_tensor(), steps, dtype=dtype)
        # every rank holds the same full result: keep the local shard, no scatter (src_data_rank=None);
        # torch before 2.6 lacks the argument and scatters rank 0's copy, the same values
        local = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
        return distribute_tensor(full, u.device_mesh, u.placements, **local)
    return newton_schulz(u, steps, dtype=dtype)


def muon_param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Split a model's parameters: hidden matrices (Muon) and the rest (AdamW, decayed / not).

    Hidden = 2-D or 3-D, not an embedding table, not the output head (the model's ``head``, a
    wrapper's ``base.head``, or a weight tied to an embedding).
    """
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(m.weight) for name, m in model.named_modules() if name in ("head", "base.head")}
    hidden, adam_decay, adam_plain, seen = [], [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() in (2, 3) and id(p) not in embedding and id(p) not in head:
            hidden.append(p)
        elif p.dim() >= 2 and (decay_embeddings or id(p) not in embedding):
            adam_decay.append(p)  # an untied output head
        else:
            adam_plain.append(p)
    groups = [
        {"params": hidden, "use_muon": True, "weight_decay": weight_decay},
        {"params": adam_decay, "use_muon": False, "weight_decay": weight_decay},
        {"params": adam_plain, "use_muon": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
