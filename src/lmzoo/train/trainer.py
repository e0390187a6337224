"""The trainer shared by every model family: ``lmzoo train`` and :func:`lmzoo.train` call it.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` x ``block_size`` tokens, the
loss of each divided by ``grad_accum`` so the summed gradient equals that of one large batch.
Everything the next step depends on (weights, optimizer moments, schedule step, data position,
RNG states) goes into each checkpoint, so ``resume=True`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..atomic import atomic_write_text
from ..errors import CheckpointError, ConfigError, DataError, LmzooError
from ..models import PRESETS, build_model, config_to_dict, preset_config
from .config import TrainConfig
from .metrics import MetricsLogger
from .optim import make_adamw
from .schedule import lr_at


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is available")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: ``auto`` is bf16 on GPUs that support it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_data_dir(cfg: TrainConfig) -> Path:
    src = Path(cfg.source).stem if ("/" in cfg.source or "." in cfg.source) else cfg.source
    tok = Path(cfg.tokenizer).name if "/" in cfg.tokenizer else cfg.tokenizer
    suffix = f"{tok}{cfg.vocab_size}" if cfg.vocab_size else tok
    return Path("data") / f"{src}-{suffix}"


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Builds data, model and optimizer from a :class:`TrainConfig` and runs the loop."""

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None):
        from ..data import TokenLoader, load_meta, prepare
        from ..tokenizer import load_tokenizer

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.out_dir = Path(cfg.out_dir)

        if model is None:  # check the model settings before any (possibly long) data preparation
            preset_config(cfg.model, **cfg.model_args)
        # -- data ---------------------------------------------------------------------------
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir(cfg)
        if not (self.data_dir / "meta.json").is_file():
            print(f"preparing {cfg.source!r} with the {cfg.tokenizer} tokenizer into {self.data_dir}")
            prepare(cfg.source, self.data_dir, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, input=cfg.input)
        self.meta = load_meta(self.data_dir)
        self.tokenizer = tokenizer or load_tokenizer(self.data_dir / "tokenizer")

        # -- model --------------------------------------------------------------------------
        if model is None:
            args = dict(cfg.model_args)
            args.setdefault("vocab_size", self.meta["vocab_size"])
            if cfg.block_size:
                args.setdefault("block_size", cfg.block_size)
            model = build_model(PRESETS[cfg.model][0], preset_config(cfg.model, **args))
        self.model = model.to(self.device)
        mcfg = self.model.config
        if getattr(mcfg, "vocab_size", self.meta["vocab_size"]) < self.meta["vocab_size"]:
            raise ConfigError(
                f"the model's vocab_size {mcfg.vocab_size} is smaller than the data's {self.meta['vocab_size']}"
            )
        self.block_size = cfg.block_size or mcfg.block_size
        if self.block_size > mcfg.block_size and getattr(self.model, "wpe", None) is not None:
            raise ConfigError(f"block_size {self.block_size} exceeds the model's {mcfg.block_size}")
        try:
            self.train_loader = TokenLoader(
                self.data_dir, "train", self.block_size, cfg.batch_size, seed=cfg.seed, device=self.device
            )
            self.val_loader = TokenLoader(
                self.data_dir, "val", self.block_size, cfg.batch_size, seed=cfg.seed + 1, device=self.device
            )
        except DataError as e:
            raise DataError(f"{e} (block_size {self.block_size} is larger than the data allows)") from None
        self._val_start = self.val_loader.state_dict()

        # -- optimizer ------------------------------------------------------------------------
        self.optimizer = make_adamw(
            self.model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.eps, cfg.decay_embeddings
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        self.step_fn = torch.compile(self.model) if cfg.compile else self.model
        self.step = 0
        self.tokens_seen = 0
        self.best_val = math.inf
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self._stop_signal: int | None = None
        if cfg.resume:
            self._resume()

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val": self.best_val,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "rng": rng_state(),
            "train_config": json.dumps(self.cfg.to_dict()),
        }

    def save_checkpoint(self) -> Path:
        """Write ckpt-<step> atomically, point LATEST at it, then prune old ones."""
        name = f"ckpt-{self.step:08d}"
        ckpt.write_checkpoint(
            self.model, self.out_dir / name, self.tokenizer, self.state_dict(), extra={"step": self.step}
        )
        ckpt.mark_latest(self.out_dir, name)
        old = sorted(p for p in self.out_dir.glob("ckpt-*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (self.cfg.keep_last - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return self.out_dir / name

    def _resume(self) -> None:
        try:
            d = ckpt.resolve(self.out_dir)
        except CheckpointError:
            print(f"resume: no checkpoint in {self.out_dir}, starting from scratch")
            return
        family, saved_cfg, _ = ckpt.read_config(d)
        mine = config_to_dict(self.model)
        theirs = config_to_dict(family, saved_cfg)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {mine.get(k)!r}" for k in diff[:4])
            raise CheckpointError(f"cannot resume from {d}: another architecture or vocabulary ({detail})")
        ckpt.load_weights(self.model, d / ckpt.WEIGHTS)
        st = ckpt.load_train_state(d)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.train_loader.load_state_dict(st["train_loader"])
        set_rng_state(st["rng"])
        self.step, self.tokens_seen, self.best_val = st["step"], st["tokens_seen"], st["best_val"]
        print(f"resumed from {d} at step {self.step}")

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, iters: int | None = None) -> float:
        """Mean val loss over the same ``eval_iters`` batches every time (low-noise comparison)."""
        self.model.eval()
        self.val_loader.load_state_dict(self._val_start)
        losses = []
        for _ in range(iters or self.cfg.eval_iters):
            x, y = self.val_loader.next_batch()
            with self.autocast:
                losses.append(self.model(x, y).loss.float().item())
        self.model.train()
        return sum(losses) / len(losses)

    # -- the loop ---------------------------------------------------------------------------
    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def train(self) -> dict[str, Any]:
        """Run until ``max_steps``; returns a summary (final val loss, tokens/s, wall time, paths)."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
        log = MetricsLogger(self.out_dir / "metrics.jsonl")
        log.log("event", self.step, event="start", params=self.model.num_params(), device=str(self.device))
        handlers = {}
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for s in (signal.SIGTERM, signal.SIGINT):
                handlers[s] = signal.signal(s, self._handle_signal)
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True, leave=True)
        decay_total = cfg.decay_steps or cfg.max_steps
        tokens_per_step = cfg.batch_size * self.block_size * cfg.grad_accum
        model, opt = self.model, self.optimizer
        model.train()
        t_start = time.time()
        val_loss = math.nan
        last_ckpt_step = -1
        try:
            while self.step < cfg.max_steps:
                t0 = time.time()
                lr = lr_at(
                    self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, total=decay_total,
                    schedule=cfg.schedule, decay_frac=cfg.wsd_decay_frac,
                )
                for group in opt.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=self.device)
                for _ in range(cfg.grad_accum):
                    x, y = self.train_loader.next_batch()
                    with self.autocast:
                        loss = self.step_fn(x, y).loss / cfg.grad_accum
                    self.scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                self.scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                loss_val, norm_val = float(loss_sum), float(norm)
                if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                    self._skip_step(opt, log, loss_val, norm_val)
                    continue
                self.nonfinite_in_row = 0
                self.scaler.step(opt)
                self.scaler.update()
                opt.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += tokens_per_step
                dt = time.time() - t0
                log.log(
                    "train", self.step, loss=loss_val, lr=lr, grad_norm=norm_val, tokens=self.tokens_seen,
                    tokens_per_s=tokens_per_step / max(dt, 1e-9), step_ms=1000 * dt,
                )
                if bar is not None:
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == cfg.max_steps:
                        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tokens_per_step / max(dt, 1e-9):,.0f}")
                is_eval = (cfg.eval_interval and self.step % cfg.eval_interval == 0) or self.step == cfg.max_steps
                if is_eval:
                    val_loss = self.evaluate()
                    log.log("eval", self.step, val_loss=val_loss)
                    if bar is not None:
                        bar.write(f"step {self.step}: val loss {val_loss:.4f}")
                    if val_loss < self.best_val:
                        self.best_val = val_loss
                        ckpt.write_checkpoint(model, self.out_dir / "best", self.tokenizer, extra={"step": self.step})
                if is_eval or (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0):
                    self.save_checkpoint()
                    last_ckpt_step = self.step
                if self._stop_signal is not None:
                    break
        finally:
            if bar is not None:
                bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if self._stop_signal is not None and last_ckpt_step != self.step:
            self.save_checkpoint()
        wall = time.time() - t_start
        summary = {
            "step": self.step,
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
            "wall_s": wall,
            "tokens_per_s": self.tokens_seen / max(wall, 1e-9) if self._stop_signal is None else None,
            "out_dir": str(self.out_dir),
            "interrupted": self._stop_signal is not None,
            "nonfinite_steps": self.nonfinite_total,
        }
        log.log("event", self.step, event="end", **{k: v for k, v in summary.items() if k not in ("out_dir", "step")})
        log.close()
        return summary

    def _skip_step(self, opt, log: MetricsLogger, loss_val: float, norm_val: float) -> None:
        opt.zero_grad(set_to_none=True)
        self.scaler.update()
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        log.log("event", self.step, event="nonfinite_skip", loss=loss_val, grad_norm=norm_val)
        if self.nonfinite_in_row >= self.cfg.max_nonfinite:
            raise LmzooError(
                f"{self.nonfinite_in_row} non-finite steps in a row at step {self.step} "
                f"(loss {loss_val}, grad norm {norm_val}): lower lr, or use bfloat16/float32 instead of float16"
            )


def train(cfg: TrainConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Library entry point: ``lmzoo.train(max_steps=100, model="gpt2-debug")``."""
    cfg = (cfg or TrainConfig()).replace(**overrides) if overrides else (cfg or TrainConfig())
    return Trainer(cfg).train()
