"""Optimizers and their parameter groups.

AdamW (Loshchilov & Hutter 2019) decays weights decoupled from the gradient step. Decay is a
prior that pulls matrices toward zero; it is not applied to biases, norm gains and (unless asked)
embeddings: these are 1-D or lookup tables whose scale carries meaning.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


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
