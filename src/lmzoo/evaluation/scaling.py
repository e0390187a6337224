"""Scaling laws: fit L(N, D) = E + A / N^alpha + B / D^beta to a sweep, and plan compute-optimal runs.

Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), approach 3: train models
of several sizes N (parameters) on several token budgets D, then fit the parametric loss by
minimizing the Huber loss (delta = 1e-3) of the *log* residual

    r_i = log( exp(a - alpha log N_i) + exp(b - beta log D_i) + exp(e) ) - log L_i

with A = exp(a), B = exp(b), E = exp(e), by L-BFGS from several starting points (the objective is
not convex; the best of the local optima wins; starts come from a variable-projection scan). Huber, not
squares: a few diverged or under-tuned runs should not drag the fit. Under C = 6 N D the loss is lowest at

    N_opt(C) = G (C / 6)^(beta / (alpha + beta)),  D_opt = C / (6 N_opt),  G = (alpha A / (beta B))^(1 / (alpha + beta))

(the compute-optimal frontier). :mod:`lmzoo.train.chinchilla` holds the paper's own fitted values.

The sweep's models come from one dial, :func:`depth_config` (nanochat's): depth sets width, heads
and the learning rate, so "a bigger model" is one number. docs/scaling-laws.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmzoo.common import optional_import, pyplot
from lmzoo.errors import ConfigError, Interrupted

HUBER_DELTA = 1e-3


class SweepInterrupted(Interrupted):
    """A sweep's run stopped before its last step (a signal): exit code 130, like an interrupt."""


@dataclasses.dataclass
class ScalingFit:
    """Fitted L(N, D) = E + A / N^alpha + B / D^beta and its compute-optimal frontier."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan  # the summed Huber loss at the optimum

    def loss(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, flops: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
        """(N_opt, D_opt) for a compute budget of ``flops`` (C = 6 N D)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * np.power(np.asarray(flops, dtype=float) / 6.0, self.beta / (self.alpha + self.beta))
        return n, np.asarray(flops, dtype=float) / (6.0 * n)

    def tokens_per_param(self, flops: float) -> float:
        n, d = self.optimal(flops)
        return float(d / n)

    def summary(self, flops: Sequence[float] = (1e12, 1e13, 1e15)) -> dict:
        """JSON-ready: the fitted constants, the frontier's exponents (N_opt ~ C^a, D_opt ~ C^b, a + b = 1)
        and (N_opt, D_opt, tokens per parameter) at each budget in ``flops``."""
        a = self.beta / (self.alpha + self.beta)
        rows = []
        for c in flops:
            n, d = self.optimal(c)
            rows.append({"flops": float(c), "params": float(n), "tokens": float(d), "tokens_per_param": float(d / n)})
        return {"fit": {k: float(v) for k, v in dataclasses.asdict(self).items()},
                "frontier_exponents": {"a": a, "b": 1.0 - a}, "frontier": rows}


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Summed Huber loss of the log residuals and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, k)
    top = terms.max(0)
    w = np.exp(terms - top)
    lse = top + np.log(w.sum(0))
    w = w / w.sum(0)  # d lse / d term
    r = lse - log_l
    small = np.abs(r) <= delta
    f = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))  # Huber'(r)
    grad = np.array([
        (dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
        -(dr * w[0] * log_n).sum(), -(dr * w[1] * log_d).sum(),
    ])
    return f, grad


def _projected_starts(n: np.ndarray, d: np.ndarray, loss: np.ndarray, k: int,
                      e_range: tuple[float | None, float | None]) -> np.ndarray:
    """Starting points (a, b, e, alpha, beta) by variable projection: for fixed exponents the law is
    *linear* in (E, A, B), so on a grid of (alpha, beta) solve a non-negative least-squares fit of
    E + A N^-alpha + B D^-beta to the losses (rows weighted by 1/L, ~ log residuals), and keep the
    ``k`` best exponent pairs. Robust where random starts of the non-convex problem are not."""
    nnls = optional_import("scipy.optimize", "scaling", "the scaling-law fit").nnls

    lo, hi = e_range
    exps = np.linspace(0.02, 1.5, 75)
    rows = []
    for alpha in exps:
        x = n**-alpha
        for beta in exps:
            cols = [x / loss, d**-beta / loss]
            target = np.ones_like(loss)
            if lo is not None and lo == hi:  # E fixed: fit A, B to L - E
                target = 1.0 - lo / loss
            else:
                cols.append(1.0 / loss)
            coef, rnorm = nnls(np.stack(cols, 1), target)
            e = lo if lo is not None and lo == hi else float(np.clip(coef[2], lo or 0.0, hi or np.inf))
            rows.append((rnorm, coef[0], coef[1], e, alpha, beta))
    rows.sort(key=lambda r: r[0])
    floor = 1e-6 * float(loss.mean())  # a zero coefficient starts as a negligible one (log of it is finite)
    return np.array([(math.log(max(a, floor)), math.log(max(b, floor)), math.log(max(e, floor)), al, be)
                     for _, a, b, e, al, be in rows[:k]])


def fit_scaling_law(
    params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], delta: float = HUBER_DELTA,
    grid: dict[str, Sequence[float]] | None = None, starts: int = 8,
    e_range: tuple[float | None, float | None] = (None, None),
) -> ScalingFit:
    """Fit L(N, D) to runs ``(params[i], tokens[i]) -> losses[i]`` (Hoffmann et al.'s approach 3).

    The Huber objective is minimized by L-BFGS from several starts. ``grid``: explicit starting
    values for a, b, e (logs of A, B, E), alpha and beta (every combination; the paper used a
    4500-point grid). Default: the ``starts`` best points of a variable-projection scan
    (:func:`_projected_starts`: exponents on a grid, E, A, B solved linearly), which finds the basin
    the paper's grid finds at a fraction of the cost. ``e_range``: optional bounds on E (natural
    units; ``(E, E)`` fixes it) for sweeps too small to pin E down (docs/scaling-laws.md).
    Needs >= 5 runs and scipy.
    """
    minimize = optional_import("scipy.optimize", "scaling", "the scaling-law fit").minimize

    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (params, tokens, losses))
    if not (n.shape == d.shape == loss.shape) or n.size < 5:
        raise ConfigError(f"a scaling fit needs >= 5 runs with N, D and loss each; got {n.size}")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise ConfigError("parameters, tokens and losses must all be positive")
    if any(v is not None and v <= 0 for v in e_range):
        raise ConfigError(f"bounds on E must be positive, got {e_range}")
    lo, hi = (None if v is None else math.log(v) for v in e_range)
    if grid is not None:
        cand = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), float)
    else:
        cand = _projected_starts(n, d, loss, max(1, starts), e_range)
    cand[:, 2] = np.clip(cand[:, 2], -np.inf if lo is None else lo, np.inf if hi is None else hi)
    cand[:, 3:] = np.clip(cand[:, 3:], 1e-3, 3.0)
    args = (np.log(n), np.log(d), np.log(loss), delta)
    bounds = [(None, None), (None, None), (lo, hi), (1e-3, 3.0), (1e-3, 3.0)]
    best = None
    for start in cand:
        res = minimize(_objective, start, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return ScalingFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta),
                      objective=float(best.fun))


def depth_config(depth: int, aspect: int = 64, head_dim: int = 64, base_lr: float = 3e-3,
                 base_width: int = 256) -> dict[str, float | int]:
    """nanochat's single dial: ``depth`` layers, width ``depth * aspect``, heads of ``head_dim``.

    The learning rate shrinks as width^-1/2 from ``base_lr`` at ``base_width`` (AdamW's update
    per weight is ~lr, so a wider layer sums more of them: keeping lr * sqrt(width) fixed keeps
    each layer's output change about constant; nanochat scales its AdamW lrs the same way).
    Returns GPT model_args (``n_layer``, ``n_head``, ``n_embd``) and ``lr``.
    """
    if depth < 1 or aspect < 1 or head_dim < 1:
        raise ConfigError(f"depth, aspect and head_dim must be >= 1, got {depth}, {aspect}, {head_dim}")
    width = depth * aspect
    n_head = max(1, width // head_dim)
    width = n_head * head_dim if width >= head_dim else width  # a whole number of heads
    return {"n_layer": depth, "n_embd": width, "n_head": n_head if width >= head_dim else 1,
            "lr": base_lr * (width / base_width) ** -0.5}


def isoflop_grid(flops: Sequence[float], params: Sequence[float]) -> list[tuple[float, float]]:
    """(N, D) pairs that spend each budget in ``flops`` on each model size: D = C / (6 N)."""
    return [(n, c / (6.0 * n)) for c in flops for n in params]


def plot_fit(fit: ScalingFit, params: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
             path: str, budgets: Sequence[float] | None = None) -> None:
    """Measured loss vs tokens per model size with the fitted curves; with ``budgets`` (an IsoFLOP
    sweep) also loss vs model size per budget (each run goes to the nearest budget); the frontier,
    with each budget's best measured size. Writes a PNG to ``path``."""
    plt = pyplot("the scaling plot", "scaling")
    n, d, loss = (np.asarray(x, dtype=float) for x in (params, tokens, losses))
    fig, axes = plt.subplots(1, 3 if budgets else 2, figsize=(16 if budgets else 11, 4.2))
    ax1, ax2 = axes[0], axes[-1]
    for size in sorted(set(n.tolist())):
        sel = n == size
        dd = np.geomspace(d[sel].min() / 1.5, d[sel].max() * 1.5, 50)
        line = ax1.plot(dd, fit.loss(size, dd), lw=1)[0]
        ax1.scatter(d[sel], loss[sel], color=line.get_color(), s=14, label=f"N={size:.3g}")
    ax1.set(xscale="log", xlabel="training tokens D", ylabel="val loss",
            title=f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax1.legend(fontsize=7)
    c = np.geomspace((6 * n * d).min() / 3, (6 * n * d).max() * 30, 50)
    n_opt, _ = fit.optimal(c)
    ax2.plot(c, n_opt, label=f"fitted N_opt ~ C^{fit.beta / (fit.alpha + fit.beta):.2f}")
    if budgets:
        b = np.asarray(sorted(budgets), dtype=float)
        nearest = b[np.abs(np.log(6 * n * d)[:, None] - np.log(b)[None, :]).argmin(1)]
        for cb in b:
            sel = nearest == cb
            if not sel.any():
                continue
            nn = np.geomspace(n[sel].min() / 1.5, n[sel].max() * 1.5, 50)
            line = axes[1].plot(nn, fit.loss(nn, cb / (6 * nn)), lw=1)[0]
            axes[1].scatter(n[sel], loss[sel], color=line.get_color(), s=14, label=f"C={cb:.0e}")
            k = np.flatnonzero(sel)[loss[sel].argmin()]
            ax2.scatter(cb, n[k], color=line.get_color(), s=24, zorder=3)
        axes[1].set(xscale="log", xlabel="parameters N", ylabel="val loss", title="IsoFLOP: loss vs size per budget")
        axes[1].legend(fontsize=7)
        ax2.scatter([], [], color="gray", s=24, label="best measured size per budget")
    ax2.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="parameters",
            title="compute-optimal frontier")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # atomic


def dial_params(depth: int, vocab_size: int, block_size: int, aspect: int = 32, head_dim: int = 16,
                model: str = "gpt2-char-cpu") -> int:
    """Parameters (all of them, embeddings included) of the sweep's model at ``depth``: built, counted."""
    from lmzoo.models import build

    dial = depth_config(depth, aspect, head_dim)
    m = build(model, n_layer=dial["n_layer"], n_embd=dial["n_embd"], n_head=dial["n_head"], vocab_size=vocab_size,
              block_size=block_size)
    return m.num_params()


def isoflop_plan(flops: Sequence[float], params: dict[int, int], tokens_per_step: int, min_steps: int = 50,
                 max_tokens: float | None = None) -> list[dict[str, float]]:
    """IsoFLOP runs: for each budget C and each depth (``params``: depth -> N), the step count that
    spends C = 6 N D with D = steps * tokens_per_step. Pairs with fewer than ``min_steps`` steps (a
    schedule that short is mostly warm-up) or more than ``max_tokens`` tokens are left out.
    Returns ``{"depth", "params", "steps", "tokens", "flops"}`` per run, in budget order."""
    if not flops or not params or tokens_per_step < 1:
        raise ConfigError("an IsoFLOP plan needs >= 1 budget, >= 1 model size and tokens_per_step >= 1")
    plan = []
    for c in flops:
        for depth, n in sorted(params.items()):
            steps = round(c / (6.0 * n * tokens_per_step))
            if steps < min_steps or (max_tokens is not None and steps * tokens_per_step > max_tokens):
                continue
            plan.append({"depth": depth, "params": n, "steps": steps, "tokens": steps * tokens_per_step,
                         "flops": float(c)})
    return plan


def run_sweep(
    source: str, out_dir: str, depths: Sequence[int] = (1, 2, 3), steps: Sequence[int] = (40, 80, 160),
    aspect: int = 32, head_dim: int = 16, batch_size: int = 8, block_size: int = 64, tokenizer: str = "char",
    log=print, plan: Sequence[tuple[int, int]] | None = None, eval_iters: int = 10, data_dir: str | None = None,
    base_lr: float = 3e-3, overwrite: bool = False,
) -> list[dict[str, float]]:
    """Train one GPT per (depth, steps) pair on ``source``; each a finished cosine run. The pairs are
    ``plan`` when given (e.g. from :func:`isoflop_plan`), else every depth x every step count.
    Returns ``{"depth", "steps", "params", "tokens", "flops", "val_loss", "wall_s"}`` per run (``log``
    gets each as it ends).

    Each point must be a finished schedule (approach 3 fits final losses): intermediate points of
    one long run would carry an unfinished learning-rate decay. The fit and plot that follow a sweep
    need scipy and matplotlib: their absence is refused before the first run, not after the last.
    """
    import time

    optional_import("scipy.optimize", "scaling", "the scaling-law fit")
    optional_import("matplotlib", "scaling", "the scaling plot")

    from lmzoo.train import TrainConfig, Trainer

    pairs = list(plan) if plan is not None else [(d, s) for d in depths for s in steps]
    if not pairs or any(d < 1 or s < 1 for d, s in pairs):
        raise ConfigError(f"a sweep needs >= 1 run and depths, steps >= 1; got {pairs}")
    runs = []
    for depth, n_steps in pairs:
        dial = depth_config(depth, aspect, head_dim, base_lr=base_lr)
        cfg = TrainConfig(
            model="gpt2-char-cpu", model_args={k: dial[k] for k in ("n_layer", "n_embd", "n_head")},
            source=source, tokenizer=tokenizer, data_dir=data_dir or str(Path(out_dir) / "data"),
            out_dir=str(Path(out_dir) / f"d{depth}-s{n_steps}"), max_steps=n_steps, eval_interval=0,
            eval_iters=eval_iters, batch_size=batch_size, block_size=block_size, lr=dial["lr"], min_lr=dial["lr"] / 10,
            warmup_steps=max(1, n_steps // 10), progress=False, sample_tokens=0, threads=1, keep_last=1,
            overwrite=overwrite,  # an earlier sweep's runs in out_dir are refused unless replaced
        )
        t0 = time.time()
        trainer = Trainer(cfg)
        summary = trainer.train()
        if summary["step"] < n_steps:  # stopped by a signal: not a finished schedule, not a point of the fit
            raise SweepInterrupted(f"the sweep stopped ({summary['stop_reason']}) in run depth {depth} at step "
                                   f"{summary['step']} of {n_steps}; {len(runs)} finished runs were logged")
        n, d = trainer.model.num_params(), n_steps * batch_size * block_size
        run = {"depth": depth, "steps": n_steps, "params": n, "tokens": d, "flops": 6.0 * n * d,
               "val_loss": summary["val_loss"], "wall_s": round(time.time() - t0, 1)}
        log(run)
        runs.append(run)
    return runs
