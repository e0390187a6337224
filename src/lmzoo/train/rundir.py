"""Run directories belong to the run that made them.

A run directory holds ``train_config.json``, ``metrics.jsonl``, ``ckpt-<step>/``, ``best/`` and ``LATEST``
(docs/checkpointing.md). Three rules keep a user's runs from damaging each other:

- a new run never starts in a directory that holds another run: it is refused with one line naming the
  ways on (``--resume``, another ``--out_dir``, or ``--overwrite``, which removes the old run's files and
  nothing else);
- without ``out_dir`` every run gets a directory of its own, ``runs/<label>-<YYYYmmdd-HHMMSS>``, and the
  link ``runs/latest`` names the newest such run, so ``lmzoo train`` then ``lmzoo generate --checkpoint
  runs/latest`` chain;
- ``resume`` restores the run's saved settings (:func:`resume_settings`): only settings that cannot change
  what the run has learnt so far (:data:`SAFE_ON_RESUME`) may be given anew; any other one is refused by name.

:func:`run_config` is the one place user settings become a :class:`TrainConfig`, for ``lmzoo train`` and
:func:`lmzoo.train`; the :class:`~lmzoo.train.Trainer` calls :func:`check_out_dir` when built and
:func:`claim` once everything else is ready.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from lmzoo.common import smoke_mode
from lmzoo.config import read_json
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.atomic import remove_tree
from lmzoo.train.config import TrainConfig

RUNS_ROOT = Path("runs")
LATEST_LINK = "latest"
CONFIG_FILE = "train_config.json"
# what a run writes into its directory (besides ckpt-<step>/): a directory holding any of them holds a run
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "LATEST", "best", "tb", "wandb", "wandb_id", "profile", "adapter",
             "result.json")

# settings a resumed run may take anew: when it stops, how often it evaluates and saves, how it reports,
# and where it runs (device, threads, the parallel layout: sharded checkpoints resume on another one, and
# the trainer refuses the one that cannot, e.g. another tensor-parallel degree). Everything else (model,
# data, tokenizer, batch, optimizer, schedule, seed) is the run's.
SAFE_ON_RESUME = frozenset({
    "max_steps", "max_time_s", "eval_interval", "eval_iters", "ckpt_interval", "keep_last", "early_stop_patience",
    "early_stop_min_delta", "progress", "tensorboard", "wandb", "wandb_project", "wandb_mode",
    "system_metrics_interval", "profile", "profile_steps", "sample_tokens", "sample_prompt", "memory_check",
    "device", "threads", "parallel", "max_nonfinite",
})


def run_files(directory: str | os.PathLike) -> list[Path]:
    """The files and directories of a run in ``directory`` (empty when it holds none)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [d / name for name in RUN_FILES if (d / name).exists()]
    return found + sorted(p for p in d.glob("ckpt-*") if p.is_dir())


def holds_run(directory: str | os.PathLike) -> bool:
    return bool(run_files(directory))


def default_out_dir(label: str, root: str | os.PathLike = RUNS_ROOT, now: float | None = None) -> Path:
    """``root/<label>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... when a directory of that name exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-.") or "run"
    base = Path(root) / f"{safe}-{stamp}"
    path, n = base, 1
    while path.exists() or path.is_symlink():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def follow(path: str | os.PathLike) -> Path:
    """``path``, or the run a link such as ``runs/latest`` points at (``runs/<name>``, not an absolute path)."""
    p = Path(path)
    if not p.is_symlink():
        return p
    target = Path(os.readlink(p))
    return p.parent / target if not target.is_absolute() else target


def latest_run(root: str | os.PathLike = RUNS_ROOT) -> Path:
    """The run ``root/latest`` names, or a one-line ConfigError when there is none."""
    link = Path(root) / LATEST_LINK
    if not link.exists():
        raise ConfigError(f"no run to resume: {link} does not exist (give --out_dir=RUN)")
    return follow(link)


def check_out_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse a new run into a directory that holds another run, before anything is written."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"out_dir {d} is a file, not a directory")
    if resume or overwrite or not holds_run(d):
        return
    raise ConfigError(
        f"{d} holds another run ({', '.join(p.name for p in run_files(d)[:3])}...); continue it with --resume, "
        f"choose another --out_dir, or replace it with --overwrite"
    )


def claim(out_dir: str | os.PathLike, overwrite: bool = False, link: bool = False) -> Path:
    """Create ``out_dir`` for a run; ``overwrite``: first remove the files of the run already there (and only
    those); ``link``: point ``<parent>/latest`` at it (atomically, a relative symlink). Returns ``out_dir``."""
    d = Path(out_dir)
    if overwrite:
        for p in run_files(d):
            if p.is_dir() and not p.is_symlink():
                remove_tree(p)  # renamed away first: a kill mid-delete leaves no half checkpoint
            else:
                p.unlink()
    d.mkdir(parents=True, exist_ok=True)
    if link:
        latest = d.parent / LATEST_LINK
        if latest.exists() and not latest.is_symlink():
            return d  # a user's own file or directory named "latest": never replaced
        tmp = d.parent / f".{LATEST_LINK}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(d.name, tmp)
        os.replace(tmp, latest)
    return d


def settle(cfg: TrainConfig) -> tuple[TrainConfig, bool]:
    """``cfg`` with its run directory: the given ``out_dir``, checked by :func:`check_out_dir`, or a new
    ``runs/<model>-<time>``; and whether it is such a default one (linked as ``runs/latest`` when claimed)."""
    if cfg.out_dir is not None:
        check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
        return cfg, False
    if cfg.resume:
        raise ConfigError("resume continues a run: give its out_dir (`lmzoo train --resume` alone resumes runs/latest)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would name its own directory
        raise ConfigError("under torchrun every process must write the same run: give out_dir")
    return cfg.replace(out_dir=str(default_out_dir(cfg.model))), True


def given_settings(cfg: TrainConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The settings a caller chose: a dict as it is, a TrainConfig's fields that differ from the defaults."""
    if cfg is None or isinstance(cfg, dict):
        return dict(cfg or {})
    default = TrainConfig()
    return {k: v for k, v in cfg.to_dict().items() if getattr(default, k) != v}


def _checkpoint_step(out_dir: Path) -> int | None:
    """The step of the newest checkpoint in a run directory, or None when it has none yet."""
    from lmzoo.formats import checkpoint as ckpt

    try:
        d = ckpt.resolve(out_dir)
        _, _, raw = ckpt.read_config(d)
    except CheckpointError:
        return None
    step = (raw.get("lmzoo") or {}).get("step")
    return step if isinstance(step, int) else None


def resume_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run continues with: its saved ``train_config.json`` plus the ``given`` settings
    that may change (:data:`SAFE_ON_RESUME`). A given setting that differs from the saved one and is not safe
    is refused by name; so is a ``max_steps`` the newest checkpoint has already reached. ``out_dir``
    (default: ``runs/latest``) names the run; a directory with no saved run starts one with ``given``."""
    out = follow(given["out_dir"]) if given.get("out_dir") else latest_run()
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():  # nothing saved yet (a new run, or one killed before it started): as given
        return {**given, "out_dir": str(out), "resume": True}
    try:  # bounded: the file may be anyone's
        saved = read_json(saved_file)
    except ConfigError as e:
        raise ConfigError(f"{e}; cannot restore the run's settings") from None
    names = set(TrainConfig.field_names())
    saved = {k: v for k, v in saved.items() if k in names}  # settings a newer lmzoo dropped
    base = TrainConfig.from_dict(saved)
    merged = TrainConfig.from_dict({**saved, **{k: v for k, v in given.items() if k not in ("out_dir", "resume")}})
    changed = [k for k in given if k not in ("out_dir", "resume") and getattr(merged, k) != getattr(base, k)]
    refused = [k for k in changed if k not in SAFE_ON_RESUME]
    if refused:
        k = refused[0]
        raise ConfigError(
            f"resume: {k} is {getattr(base, k)!r} in {out}, not {getattr(merged, k)!r}; a resumed run keeps its "
            f"settings except {', '.join(sorted(SAFE_ON_RESUME & {'max_steps', 'eval_interval', 'progress'}))} and "
            f"other reporting settings (start a new run with another --out_dir to change {k})"
        )
    step = _checkpoint_step(out)
    if step is not None and merged.max_steps <= step:
        raise ConfigError(
            f"resume: the run in {out} has reached step {step} and max_steps is {merged.max_steps}; give a larger "
            f"--max_steps to train further"
        )
    return {**merged.to_dict(), "out_dir": str(out), "resume": True, "overwrite": False}


def smoke_steps(max_steps: int) -> int:
    """LMZOO_SMOKE=1: step counts divided by 1000 (at least 1), so 2000 -> 2 and a resume to 3000 -> 3."""
    return max(1, math.ceil(max_steps / 1000))


def run_config(settings: dict[str, Any] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a run from user settings (a recipe merged with overrides): with
    ``resume``, the saved run's settings (:func:`resume_settings`). Under ``LMZOO_SMOKE=1`` (documentation
    smoke tests) the given step count shrinks by 1000x and evaluations and samples to a few batches/tokens."""
    settings = dict(settings or {})
    if smoke_mode():
        if "max_steps" in settings or not settings.get("resume"):  # a resume without one keeps the run's
            settings["max_steps"] = smoke_steps(TrainConfig(max_steps=settings.get("max_steps", 2000)).max_steps)
        settings["eval_iters"] = 1
        settings["sample_tokens"] = min(20, TrainConfig(sample_tokens=settings.get("sample_tokens", 20)).sample_tokens)
    if settings.get("resume"):
        settings = resume_settings(settings)
    return TrainConfig.from_dict(settings)


def exit_code(signum: int | None) -> int:
    """The exit status of a run stopped by signal ``signum`` (after saving), as shells expect: 128 + signum
    (130 for Ctrl-C / SIGINT, 143 for SIGTERM); 0 when it was not stopped by a signal."""
    return 0 if signum is None else 128 + int(signum)
