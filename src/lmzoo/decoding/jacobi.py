"""Jacobi (fixed-point) decoding (Santilli et al. 2023) and consistency training (Kou et al. 2024, CLLMs).

Greedy decoding of n tokens y_1..y_n after a prompt x solves n equations

    y_i = argmax_v p(v | x, y_1, ..., y_{i-1}),   i = 1..n,

which autoregressive decoding solves one at a time (n forward passes). Jacobi decoding guesses all
n at once and iterates y <- F(y), F_i(y) = argmax p(. | x, y_<i), updating every position in
parallel with one forward pass over the block. The fixed point y* = F(y*) is the greedy output,
and it is reached in at most n iterations: if y_1..y_c are already right, then F_1..F_{c+1} are
right after the next iteration (F_{c+1} sees a correct prefix). Often several tokens fall into
place in one iteration (a fixed phrase, a closing bracket): fewer passes than tokens.

Here each block of ``block`` tokens is iterated to its fixed point with a KV cache: the converged
prefix is committed (its keys and values kept, the rest of the cache rolled back) and only the
unconverged suffix is fed again, so an iteration costs one forward pass over the remaining guesses.

CLLMs (consistency large language models) fine-tune the model so that it jumps from any point of
a Jacobi trajectory straight to the fixed point: for a trajectory y^(0), ..., y^(j), ..., y* of a
prompt x, the global consistency loss

    L_GC = sum_i KL( p_{theta^-}(. | x, y*_<i) || p_theta(. | x, y^(j)_<i) )

(theta^- a stop-gradient copy, i.e. the teacher is the model's own prediction at the fixed point)
is added to the ordinary language-modelling loss L_AR that keeps the generations good:
L = L_GC + w * L_AR. After training, fewer Jacobi iterations are needed per block.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmzoo.decoding.common import (
    DecodeStats,
    leading_true,
    prepare_decoding,
    rollback_cache,
)
from lmzoo.errors import ConfigError


@dataclass
class JacobiStats(DecodeStats):
    """:class:`DecodeStats` plus the Jacobi iterations (forward passes) each block needed."""

    iterations: list[int] = field(default_factory=list)

    @property
    def mean_iterations(self) -> float:
        return sum(self.iterations) / max(len(self.iterations), 1)


@dataclass
class Trajectory:
    """One block's Jacobi trajectory: ``prefix`` (B, P) tokens before the block, ``states`` the
    iterates y^(0), y^(1), ... (each (B, n)), ``fixed`` the fixed point y* (B, n)."""

    prefix: torch.Tensor
    states: list[torch.Tensor]
    fixed: torch.Tensor


@torch.inference_mode()
def jacobi_generate(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    block: int = 16,
    init: str = "last",
    pad_id: int = 0,
    trajectories: list[Trajectory] | None = None,
) -> tuple[list[list[int]], JacobiStats]:
    """Greedy decoding by Jacobi iteration over blocks of ``block`` tokens; identical to greedy.

    ``init``: the first guess of a block, ``"last"`` (the last committed token repeated) or ``"pad"``
    (``pad_id``). Pass a list as ``trajectories`` to collect every block's iterates (CLLM data).
    Returns (new tokens of each row, :class:`JacobiStats`).
    """
    if block < 1 or max_new_tokens < 0:
        raise ConfigError(f"block must be >= 1 and max_new_tokens >= 0, got {block}, {max_new_tokens}")
    if init not in ("last", "pad"):
        raise ConfigError(f"init must be 'last' or 'pad', got {init!r}")
    ids, pad, max_len = prepare_decoding(prompts, max_new_tokens, model)
    B, P = ids.shape
    stats = JacobiStats()
    with model.evaluating():
        cache = rollback_cache(model, B, max_len, pad)
        if P > 1:
            model(ids[:, :-1], cache=cache)  # every committed token but the last is cached
        seq = ids
        while seq.shape[1] - P < max_new_tokens:
            n = min(block, max_new_tokens - (seq.shape[1] - P))
            fill = seq[:, -1:] if init == "last" else torch.full_like(seq[:, -1:], pad_id)
            guess = fill.expand(B, n)  # y^(0)
            prefix, done, iters = seq, seq.new_empty(B, 0), 0
            states = [guess]
            while done.shape[1] < n:
                r = n - done.shape[1]  # positions still to converge
                start = cache.pos
                # F on the remaining positions: [last committed, y_1..y_{r-1}] -> predictions of y_1..y_r
                g = model(torch.cat([seq[:, -1:], guess[:, : r - 1]], 1), cache=cache).logits.argmax(-1)
                iters += 1
                c = int(leading_true(guess == g).min())  # y_1..y_c were already fixed points
                m = min(c + 1, r)  # ... and F_{c+1} saw a correct prefix: commit m tokens
                cache.rollback(start + m)  # keep [last committed, y_1..y_{m-1}]
                seq = torch.cat([seq, g[:, :m]], 1)
                done = torch.cat([done, g[:, :m]], 1)
                guess = g[:, m:]  # the Jacobi update of the positions still open
                states.append(torch.cat([done, guess], 1))
                stats.accepted.append(m - 1)
                stats.proposed += r - 1
            stats.iterations.append(iters)
            stats.steps += iters
            if trajectories is not None:
                trajectories.append(Trajectory(prefix.clone(), states[:-1], done.clone()))
        stats.tokens = seq.shape[1] - P
    return seq[:, P:].tolist(), stats


def consistency_loss(model, prefix: torch.Tensor, state: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """CLLM global consistency loss for one point of a Jacobi trajectory.

    prefix (B, P) tokens before the block; state (B, n) a Jacobi iterate y^(j); fixed (B, n) the
    fixed point y*. Returns the scalar sum over the n positions of KL(teacher || student), averaged
    over rows: teacher = the model's (detached) predictions given x, y*_<i; student = its predictions
    given x, y^(j)_<i.
    """
    P = prefix.shape[1]
    if P < 1 or state.shape != fixed.shape:
        raise ConfigError("consistency_loss: need a non-empty prefix and a state shaped like the fixed point")
    with torch.no_grad():
        teacher = model(torch.cat([prefix, fixed[:, :-1]], 1)).logits[:, P - 1 :]  # (B, n, V)
    student = model(torch.cat([prefix, state[:, :-1]], 1)).logits[:, P - 1 :]
    log_t = F.log_softmax(teacher.float(), -1)
    log_s = F.log_softmax(student.float(), -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, n)
    return kl.sum(-1).mean()


def sample_consistency_batch(
    trajectories: Sequence[Trajectory], rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random trajectory and a random iterate of it (CLLM samples j uniformly): (prefix, state, fixed)."""
    t = trajectories[rng.randrange(len(trajectories))]
    return t.prefix, t.states[rng.randrange(len(t.states))], t.fixed


def consistency_train(
    model,
    trajectories: Sequence[Trajectory],
    lm_batches,
    steps: int,
    lr: float = 3e-4,
    ar_weight: float = 1.0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """A small CLLM fine-tuning loop: L = L_GC + ar_weight * L_AR for ``steps`` AdamW steps.

    ``lm_batches``: an iterator of (x, y) language-modelling batches (e.g. ``TokenLoader``'s
    ``next_batch``) for L_AR; ``trajectories`` from :func:`jacobi_generate`. Returns one record per step.
    """
    if not trajectories:
        raise ConfigError("consistency_train needs at least one trajectory (jacobi_generate(..., trajectories=[]))")
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    log = []
    for _ in range(steps):
        prefix, state, fixed = sample_consistency_batch(trajectories, rng)
        gc = consistency_loss(model, prefix, state, fixed)
        x, y = next(lm_batches)
        ar = model(x, y).loss
        loss = gc + ar_weight * ar
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"consistency": gc.item(), "ar": ar.item()})
    model.eval()
    return log
