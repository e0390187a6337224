"""Optimizer registry: ``TrainConfig.optimizer`` (adamw | muon | ademamix) -> a torch optimizer.

Per-optimizer settings come from ``TrainConfig.optimizer_args`` (``--optimizer_args.momentum=0.9``
style overrides of a dict), so adding an optimizer never adds trainer fields.

AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster, Older") is
the second recent optimizer, chosen on evidence: in the independent benchmark of Semenov et al.
2025 ("Benchmarking Optimizers for Large Language Model Pretraining") it is, with Muon, among the
few that beat a well-tuned AdamW consistently across model sizes and token budgets, while Lion and
Schedule-Free AdamW did not beat a tuned AdamW with a cosine schedule there (and Schedule-Free needs
the trainer to swap weights for evaluation). AdEMAMix adds a second, very slow momentum (beta3
~0.9999, a half-life of ~7000 steps) mixed in with weight ``alpha``: old gradients stay useful for
tens of thousands of steps, which one EMA cannot represent (it either forgets them or reacts
slowly to new ones)::

    m1 <- b1 m1 + (1 - b1) g          (fast, bias-corrected)
    m2 <- b3 m2 + (1 - b3) g          (slow, not bias-corrected)
    v  <- b2 v + (1 - b2) g^2
    W  <- W - lr ((m1_hat + alpha m2) / (sqrt(v_hat) + eps) + wd W)

alpha and beta3 are warmed up over ``warmup`` steps (the paper's schedulers: alpha linearly, beta3
so that its half-life grows linearly) because a slow EMA of the first, large gradients destabilises
early training.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmzoo.config import convert
from lmzoo.errors import ConfigError, quote, suggest
from lmzoo.train.muon import SCALINGS, Muon, muon_param_groups

OPTIMIZERS = ("adamw", "muon", "ademamix")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: decayed matrices, and the rest (biases, norms, embeddings)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_params
        if p.dim() >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel where the device has one (CUDA)."""
    groups = param_groups(model, weight_decay, decay_embeddings)
    kwargs = {}
    device = next(model.parameters()).device
    if fused is None:
        fused = device.type == "cuda"
    if fused and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    elif device.type == "cpu":
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (Pagliardini et al. 2024, Algorithm 1) with the paper's alpha / beta3 warm-up."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        warmup: int = 0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdEMAMix betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, alpha=alpha, warmup=warmup, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @staticmethod
    def _warm(step: int, alpha: float, beta1: float, beta3: float, warmup: int) -> tuple[float, float]:
        if not warmup or step >= warmup:
            return alpha, beta3
        frac = step / warmup
        # beta3 interpolated in log-half-life space: ln(beta) ~ -1/half-life, linear in frac
        lb1, lb3 = math.log(beta1), math.log(beta3)
        b3 = math.exp(lb1 * lb3 / ((1 - frac) * lb3 + frac * lb1))
        return alpha * frac, min(b3, beta3)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2, beta3_final = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg_fast"] = torch.zeros_like(p)
                    state["exp_avg_slow"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"])
                alpha, beta3 = self._warm(t, group["alpha"], beta1, beta3_final, group["warmup"])
                m1, m2, v = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
                m1.lerp_(g, 1 - beta1)
                m2.lerp_(g, 1 - beta3)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                if wd:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(m1 / (1 - beta1**t) + alpha * m2, denom, value=-lr)
        return loss


def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    args: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` over ``model``'s parameter groups; ``args``: its extra settings.

    - adamw: :func:`make_adamw` (no extra args).
    - muon: hidden matrices with Muon, the rest AdamW (:mod:`lmzoo.train.muon`); args
      ``momentum`` (0.95), ``nesterov`` (true), ``ns_steps`` (5), ``scaling`` (moonlight | modded |
      none), ``lr_mult`` (1.0; the Muon group's lr relative to the shared schedule), ``ns_dtype``
      (float32 | bfloat16).
    - ademamix: args ``beta3`` (0.9999), ``alpha`` (5.0), ``warmup`` (0: none; the paper uses the
      run length).
    """
    args = check_optimizer_args(name, args or {})
    if name == "adamw":
        opt = make_adamw(model, lr, betas, weight_decay, eps, decay_embeddings)
        if _mixes_dtensors(model):  # tensor parallel: foreach kernels refuse DTensor next to Tensor
            for g in opt.param_groups:
                g["foreach"] = False
        return opt
    if name == "muon":
        scaling = args.get("scaling", "moonlight")
        groups = muon_param_groups(model, weight_decay, decay_embeddings)
        for g in groups:
            if g["use_muon"]:
                g["lr_mult"] = float(args.get("lr_mult", 1.0))
        ns_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.get("ns_dtype", "float32")]
        return Muon(
            groups, lr=lr, momentum=float(args.get("momentum", 0.95)), nesterov=bool(args.get("nesterov", True)),
            ns_steps=int(args.get("ns_steps", 5)), scaling=scaling, ns_dtype=ns_dtype, betas=betas, eps=eps,
        )
    if name == "ademamix":
        return AdEMAMix(
            param_groups(model, weight_decay, decay_embeddings), lr=lr,
            betas=(betas[0], betas[1], float(args.get("beta3", 0.9999))), alpha=float(args.get("alpha", 5.0)),
            warmup=int(args.get("warmup", 0)), eps=eps,
        )
    raise ConfigError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}{suggest(name, OPTIMIZERS)}")


def _mixes_dtensors(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    return len(kinds) > 1


# The extra settings each optimizer takes (TrainConfig.optimizer_args): type and allowed range.
OPTIMIZER_ARGS: dict[str, dict[str, tuple[type, Any]]] = {
    "adamw": {},
    "muon": {"momentum": (float, (0.0, 1.0)), "nesterov": (bool, None), "ns_steps": (int, (1, 100)),
             "scaling": (str, SCALINGS), "lr_mult": (float, (0.0, math.inf)),
             "ns_dtype": (str, ("float32", "bfloat16"))},
    "ademamix": {"beta3": (float, (0.0, 1.0)), "alpha": (float, (0.0, math.inf)), "warmup": (int, (0, 2**62))},
}


def check_optimizer_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` for optimizer ``name`` converted to their types and checked against their ranges (``(lo, hi)``:
    lo <= value < hi, or a tuple of choices); a ConfigError names an unknown, ill-typed or out-of-range one.
    Called as the settings enter (TrainConfig.validate) and by :func:`make_optimizer`."""
    if name not in OPTIMIZER_ARGS:
        raise ConfigError(f"unknown optimizer {quote(name)}; choose from {', '.join(OPTIMIZERS)}"
                          f"{suggest(str(name), OPTIMIZERS)}")
    spec = OPTIMIZER_ARGS[name]
    unknown = sorted(str(k) for k in args if k not in spec)
    if unknown:
        known = ", ".join(sorted(spec)) or "none"
        raise ConfigError(f"unknown {name} optimizer_args {quote(unknown)}; known: {known}")
    out = {}
    for key, value in args.items():
        tp, allowed = spec[key]
        v = convert(f"optimizer_args.{key}", value, tp)
        if isinstance(allowed, tuple) and allowed and isinstance(allowed[0], str):
            if v not in allowed:
                raise ConfigError(f"optimizer_args.{key}: {quote(v)} is not one of {', '.join(allowed)}")
        elif allowed is not None and not allowed[0] <= v < allowed[1]:
            raise ConfigError(f"optimizer_args.{key} must be in [{allowed[0]}, {allowed[1]}), got {quote(v)}")
        out[key] = v
    return out
