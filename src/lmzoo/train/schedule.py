"""Learning-rate schedules, as pure functions of the step (so resuming needs only the step).

- ``cosine``: linear warmup to ``lr`` over ``warmup`` steps, then half a cosine down to ``min_lr``
  at ``decay_steps`` (Loshchilov & Hutter 2017; the GPT-2/3 and nanoGPT schedule), then ``min_lr``.
- ``wsd``: warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, a long constant phase at
  ``lr``, then a short decay to ``min_lr`` over the last ``decay_frac`` of the run (linear here).
  A run can be extended from a stable-phase checkpoint without restarting the schedule.
- ``constant``: warmup, then ``lr``.

With a wall-clock budget (``schedule_unit=time``) the decay follows the fraction of the budget
spent instead of the step count, so a run cut by ``max_time_s`` still ends at ``min_lr``.
"""

from __future__ import annotations

import math

from lmzoo.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    decay_frac: float = 0.2,
    time_frac: float | None = None,
) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of a run of ``total`` steps.

    ``time_frac`` (schedule_unit=time): the fraction of the wall-clock budget spent, which then
    replaces ``step / total`` as the run's progress after warmup (warmup stays in steps).
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        if time_frac is not None:
            progress = min(1.0, time_frac)
        elif step >= total:
            return min_lr
        else:
            progress = (step - warmup) / max(1, total - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if schedule == "wsd":
        if time_frac is not None:
            progress = min(1.0, max(0.0, (time_frac - (1 - decay_frac)) / max(decay_frac, 1e-9)))
        else:
            decay_start = total - int(round(decay_frac * total))
            if step < decay_start:
                return lr
            progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return lr + (min_lr - lr) * progress
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
