"""Chunked linear + cross-entropy: the loss of an LM head without the whole float32 logits tensor.

The last step of a language model is ``loss = CE(h @ W^T, y)`` with h (N, C) the final hidden
states of N = B * T tokens and W (V, C) the output matrix. Written plainly it materializes the
logits (N, V), then a float32 copy for a stable softmax, then their gradient (N, V) in the
backward pass. For GPT-2 (V = 50,304 padded) at 12 x 1024 tokens that is 1.2 GB in bf16 plus
2.5 GB for each float32 tensor: more than all the activations of the twelve blocks together.

Here the N rows are cut into chunks of ``chunk`` tokens. For each chunk the forward pass computes
its logits (float32, (chunk, V)), the loss terms ``logsumexp(z) - z[y]`` and, right away, the
gradient of the summed loss with respect to the logits, ``softmax(z) - onehot(y)``, which it turns
into the chunk's share of dL/dh (``g @ W``) and dL/dW (``g^T @ h``). Only dL/dh (N, C), dL/dW
(V, C) and one chunk's logits are alive at any time; the backward pass only scales the stored
gradients by the incoming gradient. Peak extra memory goes from about ``N * V * (2 + 4 + 4)`` bytes
to ``chunk * V * 4 * 2`` (docs/performance.md has the arithmetic).

Rows whose target is ``-1`` are ignored (as :func:`lmzoo.models.base.lm_loss`). ``vocab_size``
smaller than W's rows masks the padding rows of a padded vocabulary (their logits are -inf: never
a probability, never a gradient). The same mean loss and gradients as the plain path, tested to
1e-5 in tests/test_chunked_ce.py.
"""

from __future__ import annotations

import torch


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(n, C) x (V_pad, C) -> float32 logits (n, V_pad), padding columns -inf."""
    z = (h @ weight.t()).float()
    if vocab_size < weight.shape[0]:
        z[:, vocab_size:] = float("-inf")
    return z


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight^T``; gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, vocab_size: int):
        N = h.shape[0]
        valid = targets != -1
        n_valid = valid.sum().clamp_min(1).float()  # a tensor: no host synchronization
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, N, chunk):
            hc, yc, mc = h[s : s + chunk], targets[s : s + chunk].clamp_min(0), valid[s : s + chunk]
            z = _chunk_logits(hc, weight, vocab_size)  # (n, V) float32: the only (.., V) tensor alive
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            picked = z.gather(1, yc[:, None]).squeeze(1)
            loss_sum = loss_sum + ((lse - picked) * mc).sum()
            # d(sum of losses)/dz = softmax(z) - onehot(y), zero on ignored rows; in place over z
            g = z.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -1.0))
            g.mul_(mc[:, None])
            g = g.to(h.dtype) if h.dtype != torch.float32 else g
            grad_h[s : s + chunk] = (g @ weight.to(g.dtype)).to(h.dtype)
            grad_w += (g.t() @ hc.to(g.dtype)).float()
        grad_h.div_(n_valid.to(grad_h.dtype))
        grad_w.div_(n_valid)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 4096,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``h @ weight^T`` (float32), computed ``chunk`` tokens at a time.

    h (..., C) hidden states, weight (V_pad, C) the LM head, targets (...) with -1 ignored;
    ``vocab_size`` (default V_pad) masks the padding rows of a padded vocabulary. Without
    gradients (evaluation) only the loss is computed, still chunk by chunk.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    V = weight.shape[0] if vocab_size is None else vocab_size
    h2, y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h2, weight, y, chunk, V)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h2.shape[0], chunk):
        z, yc = _chunk_logits(h2[s : s + chunk], weight, V), y[s : s + chunk]
        total = total + torch.nn.functional.cross_entropy(z, yc, ignore_index=-1, reduction="sum")
    return total / (y != -1).sum().clamp_min(1).float()
