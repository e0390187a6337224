"""Loss curves of one or several runs into a PNG (``lmzoo plot RUN_DIR... [--out FILE.png]``).

Reads each run's ``metrics.jsonl``: train loss (thin line, smoothed with an exponential moving
average) and val loss (thick line with markers, the same colour) against the step or the number
of tokens seen. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.common import pyplot
from lmzoo.errors import ConfigError
from lmzoo.train.metrics import read_metrics

X_AXES = ("step", "tokens", "time")


def _ema(values: list[float], alpha: float) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else alpha * m + (1 - alpha) * v
        out.append(m)
    return out


def _x(rec: dict, axis: str) -> float | None:
    if axis == "step":
        return rec["step"]
    if axis == "tokens":
        return rec.get("tokens")
    return rec.get("wall_s")


def default_plot_path(run_dirs: list[str | Path]) -> Path:
    """Where ``lmzoo plot`` writes without ``--out``: ``loss.png`` in the first run directory (never the
    current directory, which may be a repository with its own files)."""
    first = Path(run_dirs[0]) if run_dirs else Path(".")
    return (first if first.is_dir() else first.parent) / "loss.png"


def plot_runs(
    run_dirs: list[str | Path],
    out: str | Path,
    x: str = "step",
    smooth: float = 0.9,
    labels: list[str] | None = None,
    log_y: bool = False,
    title: str | None = None,
) -> Path:
    """Draw train and val loss of every run in ``run_dirs`` into ``out`` (PNG); returns the path."""
    if x not in X_AXES:
        raise ConfigError(f"plot: x must be one of {', '.join(X_AXES)}, got {x!r}")
    if not 0 <= smooth < 1:
        raise ConfigError(f"plot: smooth must be in [0, 1), got {smooth}")
    if not run_dirs:
        raise ConfigError("plot: give at least one run directory")
    runs = []
    for d in run_dirs:
        f = Path(d) / "metrics.jsonl" if Path(d).is_dir() else Path(d)
        if not f.is_file():
            raise ConfigError(f"plot: {d} has no metrics.jsonl (not a run directory?)")
        recs = read_metrics(f)
        if not any(r.get("kind") in ("train", "eval") for r in recs):
            raise ConfigError(f"plot: {f} holds no train or eval records yet")
        runs.append(recs)
    labels = labels or [Path(d).resolve().name for d in run_dirs]

    plt = pyplot("lmzoo plot")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (recs, label) in enumerate(zip(runs, labels)):
        color = f"C{i % 10}"
        train = [(_x(r, x), r.get("loss")) for r in recs if r.get("kind") == "train"]
        train = [(a, b) for a, b in train if a is not None and isinstance(b, float)]
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, _ema(list(ys), smooth), color=color, lw=0.8, alpha=0.5, label=f"{label} train")
        val = [(_x(r, x), r.get("val_loss")) for r in recs if r.get("kind") == "eval"]
        val = [(a, b) for a, b in val if a is not None and isinstance(b, float)]
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, color=color, lw=2, marker="o", ms=3, label=f"{label} val")
    ax.set_xlabel({"step": "optimizer step", "tokens": "tokens seen", "time": "wall time (s)"}[x])
    ax.set_ylabel("loss (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
