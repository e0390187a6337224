"""What a training run reports and when it stops, kept out of the loop so the loop reads top to bottom.

- :class:`RunReport`: the run's records, one per optimizer step, evaluation and event, to the
  metrics JSONL (and TensorBoard, W&B when asked; rank 0 only) and to the progress bar.
- :class:`Stopping`: when to evaluate, checkpoint and stop: every ``eval_interval`` steps and at the
  end; at ``max_steps``, when the time budget runs out (one evaluation's time is kept in reserve, so
  the last evaluation fits inside the budget), when early stopping's patience is spent, or on a
  signal (SIGINT, SIGTERM: the loop saves, then stops).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import torch

from lmzoo.layers.moe import loggable
from lmzoo.train.loggers import Loggers, TensorBoardLogger, WandbLogger, system_metrics
from lmzoo.train.metrics import MetricsLogger
from lmzoo.train.mfu import mfu


class RunReport:
    """The run's records: ``start``, one ``step`` per optimizer step, ``eval``, ``event``, ``close``."""

    def __init__(self, trainer) -> None:
        self.trainer, cfg = trainer, trainer.cfg
        self.loggers = Loggers()
        self.bar = None
        if trainer.dist.is_main:  # only rank 0 writes logs
            settings = cfg.to_dict()
            tb = TensorBoardLogger(trainer.out_dir / "tb", settings) if cfg.tensorboard else None
            wb = WandbLogger(trainer.out_dir, cfg.wandb_project, trainer.run_name, cfg.wandb_mode,
                             settings) if cfg.wandb else None
            self.loggers = Loggers(MetricsLogger(trainer.out_dir / "metrics.jsonl"), tb, wb)
            if cfg.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc="train", dynamic_ncols=True,
                                leave=True)

    def start(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        self.event(
            "start", run_name=t.run_name, params=t.model.num_params(),
            non_embedding_params=t.model.num_params(non_embedding=True), device=str(t.device),
            device_name=t.device_name, dtype=str(t.dtype).replace("torch.", ""), param_dtype=cfg.param_dtype,
            flops_per_token=t.flops_per_token, peak_flops=t.peak_flops, world_size=t.dist.world_size,
            block_size=t.block_size, batch_size=cfg.batch_size, grad_accum=t.grad_accum,
            threads=torch.get_num_threads(),
        )

    def step(self, step, dt: float) -> None:
        """One optimizer step's record (``step``: the :class:`~lmzoo.train.trainer.StepResult`) and its
        wall time ``dt``."""
        t, cfg = self.trainer, self.trainer.cfg
        tok_s = step.tokens / max(dt, 1e-9)
        rec = dict(loss=step.loss, lr=step.lr, grad_norm=step.grad_norm, tokens=t.tokens_seen, tokens_per_s=tok_s,
                   step_ms=1000 * dt, micro_batches=step.micro_batches)
        if step.out is not None:
            rec.update(loggable(step.out.aux))  # MoE: router losses, expert loads (last micro-batch)
        if t.peak_flops:  # tok_s counts every rank's tokens: per device, over world_size peaks
            rec["mfu"] = mfu(t.flops_per_token, tok_s, t.peak_flops, t.dist.world_size)
        if t.step % cfg.system_metrics_interval == 0:
            rec.update(system_metrics(t.device))
        self.loggers.log("train", t.step, **rec)
        if self.bar is not None:
            self.bar.update(1)
            if t.step % 10 == 0 or t.step == cfg.max_steps:
                self.bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{tok_s:,.0f}")

    def eval(self, val_loss: float, eval_s: float) -> None:
        t = self.trainer
        self.loggers.log("eval", t.step, val_loss=val_loss, tokens=t.tokens_seen, eval_s=eval_s)
        if self.bar is not None:
            self.bar.write(f"step {t.step}: val loss {val_loss:.4f}")

    def event(self, name: str, **fields: Any) -> None:
        self.loggers.log("event", self.trainer.step, event=name, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.loggers.close()


class Stopping:
    """When the loop evaluates, checkpoints and stops (see the module docstring)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.cfg = trainer, trainer.cfg
        self.reason = "max_steps"  # why the run ended: max_steps, time, early_stop, signal
        self.last_eval_s = 0.0  # the last evaluation's duration, on the budget's clock
        self.signal: int | None = None

    def out_of_time(self) -> bool:
        """The time budget, with the next evaluation's time kept in reserve, is spent."""
        return bool(self.cfg.max_time_s) and self.trainer.elapsed() + self.last_eval_s >= self.cfg.max_time_s

    def eval_due(self, out_of_time: bool) -> bool:
        step, cfg = self.trainer.step, self.cfg
        return bool(cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps or out_of_time

    def checkpoint_due(self, evaluated: bool) -> bool:
        return evaluated or bool(self.cfg.ckpt_interval and self.trainer.step % self.cfg.ckpt_interval == 0)

    def stop(self, out_of_time: bool, early_stop: bool) -> bool:
        """Whether the loop stops after this step; sets :attr:`reason`."""
        if early_stop:
            self.reason = "early_stop"
        elif out_of_time:
            self.reason = "time"
        elif self.signal is not None:
            self.reason = "signal"
        return self.reason != "max_steps"

    @contextlib.contextmanager
    def signals(self):
        """SIGINT and SIGTERM set :attr:`signal` instead of killing the process: the loop finishes its
        step, saves, and stops. The previous handlers come back after."""
        def handle(signum, frame) -> None:
            self.signal = signum

        handlers = {}
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for s in (signal.SIGTERM, signal.SIGINT):
                handlers[s] = signal.signal(s, handle)
        try:
            yield self
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
