"""The trainer shared by every model family: ``lmzoo train`` and :func:`lmzoo.train` call it.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` x ``block_size`` tokens, the
loss of each divided by the number of micro-batches so the summed gradient equals that of one
large batch (docs/gradient-accumulation.md). Everything the next step depends on (weights,
optimizer moments, schedule step, data position, RNG states, early-stopping state, time spent)
goes into each checkpoint, so ``resume=True`` continues bit for bit (docs/checkpointing.md).

The model is prepared from outside, in this order: the configured variants (multi-token heads,
BitNet layers: :mod:`.variants`), parameters cast and norms kept in float32
(:mod:`.precision`), blocks wrapped for activation checkpointing
(:mod:`.activation_checkpointing`), the optimizer built, then ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lmzoo import distributed as dist
from lmzoo.common import DTYPES, resolve_device, resolve_dtype
from lmzoo.errors import CheckpointError, ConfigError, DataError, LmzooError, ResourceError
from lmzoo.formats import checkpoint as ckpt
from lmzoo.formats.atomic import REMEDY, atomic_write_text, clean_stale, remove_tree
from lmzoo.memguard import check_batch_fits, check_fits
from lmzoo.models import PRESETS, build_model, config_to_dict, preset_config
from lmzoo.train import rundir
from lmzoo.train.activation_checkpointing import apply_activation_checkpointing
from lmzoo.train.config import TrainConfig, accumulation_steps, grad_accum_at
from lmzoo.train.mfu import device_peak_flops
from lmzoo.train.optimizers import make_optimizer
from lmzoo.train.precision import apply_precision, autocast, setup_tf32
from lmzoo.train.progress import RunReport, Stopping
from lmzoo.train.runtime import (
    data_plan,
    rng_state,
    same_tokenizer,
    seed_everything,
    set_rng_state,
)
from lmzoo.train.schedule import lr_at
from lmzoo.train.variants import apply_variants, check_variants, saved_variants, variants_of


class StepResult(NamedTuple):
    """What one optimizer step did: mean loss and gradient norm over every rank, the learning rate,
    micro-batches, tokens (every rank's) and the last micro-batch's model output (its ``aux``)."""

    loss: float
    grad_norm: float
    lr: float
    micro_batches: int
    tokens: int
    out: Any


class Trainer:
    """Builds data, model and optimizer from a :class:`TrainConfig` and runs the loop.

    Two hooks let fine-tuning reuse the loop (``lmzoo.peft.finetune``): ``data=(train, val)`` loaders
    with the :class:`~lmzoo.data.TokenLoader` protocol (``next_batch()``, ``state_dict()``,
    ``load_state_dict()``, ``block_size``, ``meta``) replace the prepared token files (e.g. packed
    instruction rows whose targets are -1 outside the responses; needs ``model`` and ``tokenizer``);
    ``loss_fn(model, x, y, cache=None) -> LMOutput`` replaces the model's own training loss (e.g.
    distillation against a teacher). Evaluation keeps the model's own loss on the val batches.
    """

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, data=None, loss_fn=None):
        from lmzoo.data import TokenLoader, load_meta, prepare
        from lmzoo.tokenizer import load_tokenizer

        # never into another run's directory; without out_dir a new one of its own (train/rundir.py)
        cfg, self._default_out_dir = rundir.settle(cfg)
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.param_dtype = DTYPES[cfg.param_dtype]
        setup_tf32(self.device, cfg.tf32)
        self.out_dir = Path(cfg.out_dir)
        self.run_name = cfg.run_name or self.out_dir.resolve().name
        # torchrun: check the layout, join the process group (docs/distributed.md)
        self.dist = dist.setup(cfg.parallel, cfg.batch_size, cfg.global_batch, device_type=self.device.type)
        self.grad_accum = cfg.grad_accum
        if cfg.global_batch:
            self.grad_accum = accumulation_steps(cfg.global_batch, cfg.batch_size, self.dist.dp_size)

        if model is None:  # check the model settings before any (possibly long) data preparation
            mcfg0 = preset_config(cfg.model, **cfg.model_args)
            check_variants(cfg.multi_token, cfg.bitnet, cfg.parallel, PRESETS[cfg.model][0], mcfg0)
            # refuse a model whose weights + grads + AdamW state cannot fit (lmzoo.memguard)
            model_bytes = check_fits(PRESETS[cfg.model][0], mcfg0, self.device, self.param_dtype, training=True,
                                     where=f"model {cfg.model}", check=cfg.memory_check)
            # ... and one micro-batch beside it, before the run writes anything
            check_batch_fits(mcfg0, cfg.batch_size, cfg.block_size or getattr(mcfg0, "block_size", 0), self.device,
                             self.dtype, model_bytes, stages=self.dist.world_size if cfg.parallel.get("mode") == "pp"
                             else 1, where=f"model {cfg.model}", check=cfg.memory_check)
        if data is not None and (model is None or tokenizer is None):
            raise ConfigError("Trainer(data=...) needs the model and tokenizer too")
        self.loss_fn = loss_fn
        # -- data ---------------------------------------------------------------------------
        # an unprepared data_dir is an error unless a source to prepare is named (runtime.data_plan)
        self.data_dir, source = (None, None) if data is not None else data_plan(cfg)
        with dist.main_first(self.dist):  # rank 0 prepares, the others wait
            if source is not None and not (self.data_dir / "meta.json").is_file():
                print(f"preparing {source!r} with the {cfg.tokenizer} tokenizer into {self.data_dir}")
                prepare(source, self.data_dir, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, input=cfg.input)
        if self.data_dir is not None:  # saved with the run's settings: a resume reads the same data
            self.cfg = cfg = cfg.replace(data_dir=str(self.data_dir))
        self.meta = data[0].meta if data is not None else load_meta(self.data_dir)
        self.tokenizer = tokenizer or load_tokenizer(self.data_dir / "tokenizer")

        # -- model --------------------------------------------------------------------------
        if model is None:
            args = dict(cfg.model_args)
            args.setdefault("vocab_size", self.meta["vocab_size"])
            if cfg.block_size:
                args.setdefault("block_size", cfg.block_size)
            model = build_model(PRESETS[cfg.model][0], preset_config(cfg.model, **args))
            model = apply_variants(model, cfg.multi_token, cfg.bitnet)  # MTP heads, BitNet layers
        self.model = model.to(self.device)
        mcfg = self.model.config
        if getattr(mcfg, "vocab_size", self.meta["vocab_size"]) < self.meta["vocab_size"]:
            raise ConfigError(
                f"the model's vocab_size {mcfg.vocab_size} is smaller than the data's "
                f"{self.meta['vocab_size']}"
            )
        self.block_size = data[0].block_size if data is not None else cfg.block_size or mcfg.block_size
        if self.model.max_positions() is not None and self.block_size > self.model.max_positions():
            raise ConfigError(f"block_size {self.block_size} exceeds the model's {mcfg.block_size}")
        if data is not None:
            self.train_loader, self.val_loader = data
        else:
            try:
                mode = "stream" if cfg.recurrence else cfg.data_order
                self.train_loader = TokenLoader(
                    self.data_dir, "train", self.block_size, cfg.batch_size, seed=cfg.seed, device=self.device,
                    mode=mode, rank=self.dist.dp_rank, world_size=self.dist.dp_size,  # own windows
                    prefetch=self.device.type == "cuda",  # read batch s+1 while the GPU runs s
                )
                self.val_loader = TokenLoader(
                    self.data_dir, "val", self.block_size, cfg.batch_size, seed=cfg.seed + 1, device=self.device,
                    mode=mode, rank=self.dist.dp_rank, world_size=self.dist.dp_size,
                )
            except DataError as e:
                raise DataError(f"{e} (block_size {self.block_size} is larger than the data allows)") from None
        self._val_start = self.val_loader.state_dict()
        # recurrence: the training memory (the model's cache, bounded: e.g. Transformer-XL's mem_len);
        # not checkpointed, a resumed run starts with an empty one
        self.memory = self.model.init_cache(cfg.batch_size) if cfg.recurrence else None

        # -- precision, activation checkpointing, optimizer, compilation ----------------------
        if self.dtype != torch.float32 or self.param_dtype != torch.float32:
            apply_precision(self.model, self.param_dtype, cfg.fp32_norms)
        if cfg.grad_checkpointing:
            apply_activation_checkpointing(self.model)
        # ddp / fsdp / tp / pp from outside (distributed/engine.py); self.model keeps its names.
        # train_model: what a step calls (None under pp: self.par.pipeline runs the stages)
        self.par = dist.parallelize_for_trainer(self.model, self.dist, cfg.batch_size, cfg.global_batch)
        self.train_model = self.par.module
        self.optimizer = make_optimizer(  # adamw | muon | ademamix (train/optimizers.py)
            cfg.optimizer, self.par.opt_module, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.eps,
            cfg.decay_embeddings, cfg.optimizer_args,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.autocast = autocast(self.device, self.dtype)
        self.step_fn = (
            torch.compile(self.train_model, backend=cfg.compile_backend)
            if cfg.compile and self.train_model is not None else self.train_model
        )
        # with recurrence, Transformer-XL's memory is attended too (its mem_len keys)
        self.flops_per_token = self.model.flops_per_token(self.block_size, recurrent=cfg.recurrence)
        self.peak_flops, self.device_name = device_peak_flops(self.device, cfg.peak_flops)

        self.step = 0
        self.tokens_seen = 0
        self.best_val = math.inf
        self.es_best = math.inf  # early stopping: best val loss by more than min_delta
        self.es_bad_evals = 0  # evaluations since that improvement
        self.train_time_s = 0.0  # wall time of earlier (resumed-from) sessions
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self._stop_signal: int | None = None
        if cfg.resume:
            self._resume()
        if self.dist.is_main:  # everything is ready: make the run's directory (a default one linked as runs/latest)
            rundir.claim(self.out_dir, cfg.overwrite, link=self._default_out_dir)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val": self.best_val,
            "es_best": self.es_best,
            "es_bad_evals": self.es_bad_evals,
            "train_time_s": self.elapsed(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "rng": rng_state(),
            "train_config": json.dumps(self.cfg.to_dict()),
        }

    def _latest_name(self) -> str:
        f = self.out_dir / ckpt.LATEST
        return f.read_text().strip() if f.is_file() else "(none yet)"

    def _guarded_write(self, what: str, write) -> None:
        """Run a checkpoint write; an OS error (disk full) becomes one clear line naming what survived."""
        try:
            write()
        except OSError as e:  # atomic_path turns the libraries' own write errors into OSErrors
            reason = e.strerror or str(e)
            remedy = REMEDY.get(e.errno, "fix the cause")  # never "free space" for a read-only directory
            raise OSError(
                e.errno, f"could not write {what} in {self.out_dir}: {reason}; the newest complete "
                f"checkpoint {self._latest_name()} is intact ({remedy}, then --resume)"
            ) from None

    def save_checkpoint(self) -> Path:
        """Write ckpt-<step> atomically, point LATEST at it, then prune old ones."""
        name = f"ckpt-{self.step:08d}"
        # fsdp/tp/pp: every rank writes its shards (dcp/) and helps gather the whole weights
        shards = self.par.save_shards(self.out_dir / f"{name}.dcp", self.optimizer)
        weights = self.par.full_state()
        if not self.dist.is_main:  # DDP: replicas are identical, rank 0 writes
            return self.out_dir / name

        def write() -> None:
            state = self.state_dict()
            if shards is not None:
                del state["optimizer"]  # sharded, in dcp/
            ckpt.write_checkpoint(
                self.model, self.out_dir / name, self.tokenizer, state, extra={"step": self.step}, weights=weights,
                shards=shards,
            )
            ckpt.mark_latest(self.out_dir, name)

        self._guarded_write(f"checkpoint {name}", write)
        old = sorted(p for p in self.out_dir.glob("ckpt-*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (self.cfg.keep_last - 1))]:
            remove_tree(p)  # renamed away first: a kill mid-delete leaves no half checkpoint
        return self.out_dir / name

    def _save_best(self) -> None:
        weights = self.par.full_state()  # fsdp/tp/pp: every rank takes part in the gather
        if not self.dist.is_main:
            return
        def write() -> None:
            extra = {"step": self.step}
            ckpt.write_checkpoint(self.model, self.out_dir / "best", self.tokenizer, extra=extra, weights=weights)

        self._guarded_write("the best checkpoint", write)

    def _resume(self) -> None:
        try:
            d = ckpt.resolve(self.out_dir)
        except CheckpointError:
            print(f"resume: no checkpoint in {self.out_dir}, starting from scratch")
            return
        family, saved_cfg, raw = ckpt.read_config(d)
        mine = {**config_to_dict(self.model), **variants_of(self.model)}
        theirs = {**config_to_dict(family, saved_cfg), **saved_variants(raw.get("lmzoo") or {})}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {mine.get(k)!r}" for k in diff[:4])
            raise CheckpointError(f"cannot resume from {d}: another architecture or vocabulary ({detail})")
        saved_tok = ckpt.load_tokenizer_of(d)
        if saved_tok is not None and not same_tokenizer(saved_tok, self.tokenizer):
            raise CheckpointError(
                f"cannot resume from {d}: it was trained with another tokenizer than {self.data_dir}'s "
                "(same vocabulary size, different tokens)"
            )
        # checked against the optimizer when it holds the optimizer's state (not sharded in dcp/)
        st = ckpt.load_train_state(d, None if self.par.sharded or (d / "dcp").is_dir() else self.optimizer)
        if (d / "dcp").is_dir():  # sharded weights + optimizer state, read into this run's layout
            self.par.load_shards(d / "dcp", self.optimizer)
        elif self.par.sharded:
            raise CheckpointError(f"cannot resume parallel.mode={self.par.mode} from {d}: it has no sharded dcp/")
        else:
            ckpt.load_weights(self.model, d / ckpt.WEIGHTS)
            self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.train_loader.load_state_dict(dist.loader_state(st["train_loader"], self.dist.dp_size))
        set_rng_state(st["rng"])
        self.step, self.tokens_seen, self.best_val = st["step"], st["tokens_seen"], st["best_val"]
        self.es_best = st.get("es_best", self.best_val)
        self.es_bad_evals = st.get("es_bad_evals", 0)
        self.train_time_s = st.get("train_time_s", 0.0)
        print(f"resumed from {d} at step {self.step}")

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, iters: int | None = None) -> float:
        """Mean val loss (next-token cross-entropy) over the same ``eval_iters`` batches every time."""
        self.model.eval()
        self.val_loader.load_state_dict(self._val_start)
        memory = self.model.init_cache(self.cfg.batch_size) if self.cfg.recurrence else None  # fresh each time
        losses = []
        for _ in range(iters or self.cfg.eval_iters):
            x, y = self.val_loader.next_batch()
            with self.autocast:
                if self.par.pipeline is not None:  # pp: the stages run the forward in turn
                    losses.append(self.par.pipeline.eval_loss(x, y))
                    continue
                out = self.model(x, y, cache=memory)
                # the next-token cross-entropy, comparable across models: without MoE router losses,
                # and head 1's alone for multi-token prediction (both report it as aux["lm_loss"])
                losses.append((out.aux or {}).get("lm_loss", out.loss).float().item())
        self.model.train()
        return dist.reduce_mean(sum(losses) / len(losses), self.dist)  # mean over ranks' shards

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run until ``max_steps``, the time budget, early stopping or a signal; returns a summary.

        Each pass: one optimizer step (:meth:`optimizer_step`), its record, then, when due, an
        evaluation (best checkpoint, early stopping) and a checkpoint (:class:`~.progress.Stopping`
        decides when, and when to stop). A skipped non-finite step repeats the pass.
        """
        cfg = self.cfg
        self._start_run_dir()
        report, stopping = RunReport(self), Stopping(self)
        report.start()
        self.model.train()
        self._session_start, wall_start, session_tokens = self._clock(), time.time(), 0
        val_loss, last_ckpt_step = math.nan, -1
        with self._errors_reported(report), stopping.signals(), self._profiler() as prof:
            while self.step < cfg.max_steps:
                t0 = time.time()
                step = self.optimizer_step(report)
                if step is None:  # non-finite loss or gradient: skipped, nothing changed
                    continue
                session_tokens += step.tokens
                report.step(step, time.time() - t0)
                if prof is not None:
                    prof.step()
                out_of_time, early_stop = stopping.out_of_time(), False
                evaluate = stopping.eval_due(out_of_time)
                if evaluate:
                    val_loss, early_stop = self._evaluate_and_keep_best(report, stopping)
                if stopping.checkpoint_due(evaluate):
                    self.save_checkpoint()
                    last_ckpt_step = self.step
                if stopping.stop(out_of_time, early_stop):
                    if stopping.reason != "signal":
                        report.event(stopping.reason, elapsed_s=self.elapsed())
                    break
        self._stop_signal = stopping.signal
        if self._stop_signal is not None and last_ckpt_step != self.step:
            self.save_checkpoint()  # a signal between checkpoints: save where the run stands
        return self._summary(report, val_loss, wall_start, session_tokens, stopping.reason)

    def optimizer_step(self, report: RunReport) -> StepResult | None:
        """One optimizer step: the schedule's learning rate, ``grad_accum`` micro-batches (each loss
        divided by their number, so the gradients sum to one large batch's), clipping, the update.
        A non-finite loss or gradient norm skips the update (:meth:`_skip_step`) and returns None."""
        cfg, opt = self.cfg, self.optimizer
        lr = self.lr()
        for group in opt.param_groups:
            group["lr"] = lr
        accum = grad_accum_at(self.step, cfg, self.grad_accum)
        loss_sum = torch.zeros((), device=self.device)
        out = None
        for micro in range(accum):
            x, y = self.train_loader.next_batch()
            if self.par.pipeline is not None:  # pp: the schedule runs every stage, forward and backward
                with self.autocast:
                    loss_sum += self.par.pipeline.step(x, y, accum) / accum
                continue
            # DDP: all-reduce gradients only after the last micro-batch (no_sync)
            with dist.gradient_sync(self.train_model, micro == accum - 1):
                with self.autocast:
                    if self.loss_fn is None:
                        out = self.step_fn(x, y, cache=self.memory)
                    else:  # e.g. distillation (peft/distill.py)
                        out = self.loss_fn(self.step_fn, x, y, cache=self.memory)
                    loss = out.loss / accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(opt)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = self.par.clip_grad_norm(clip)  # the global norm, shards counted once
        loss_val, norm_val = dist.reduce_mean(loss_sum, self.dist), float(norm)  # mean over ranks
        if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
            self._skip_step(opt, report, loss_val, norm_val)
            return None
        self.nonfinite_in_row = 0
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        tokens = cfg.batch_size * self.block_size * accum * self.dist.dp_size  # every rank's
        self.tokens_seen += tokens
        return StepResult(loss_val, norm_val, lr, accum, tokens, out)

    def _evaluate_and_keep_best(self, report: RunReport, stopping: Stopping) -> tuple[float, bool]:
        """Evaluate (timed on the budget's clock), save ``best/`` on a new best; (val loss, early stop)."""
        start = self._clock()
        val_loss = self.evaluate()
        stopping.last_eval_s = self._clock() - start
        report.eval(val_loss, stopping.last_eval_s)
        if val_loss < self.best_val:
            self.best_val = val_loss
            self._save_best()
        return val_loss, self._early_stop(val_loss)

    def _start_run_dir(self) -> None:
        """The run directory, repaired from what a kill left, with this run's settings beside the checkpoints."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            clean_stale(self.out_dir)  # what a kill -9 inside an atomic write or a prune left behind
            atomic_write_text(self.out_dir / "train_config.json", json.dumps(self.cfg.to_dict(), indent=2))

    @contextlib.contextmanager
    def _errors_reported(self, report: RunReport):
        """An error ends the run with an ``error`` event in its log; running out of memory in a step is one
        line naming the sizes to change (the last checkpoint stays valid: nothing is written after)."""
        try:
            yield
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                report.event("error", error=f"{type(e).__name__}: {str(e)[:300]}")
                report.close()
                raise
            err = self._out_of_memory()
            report.event("error", error=f"ResourceError: {err}")
            report.close()
            raise err from None
        except BaseException as e:
            report.event("error", error=f"{type(e).__name__}: {str(e)[:300]}")
            report.close()
            raise
        finally:
            if report.bar is not None:
                report.bar.close()

    def _summary(self, report: RunReport, val_loss: float, wall_start: float, session_tokens: int,
                 stop_reason: str) -> dict[str, Any]:
        wall = time.time() - wall_start
        self.train_time_s, self._session_start = self.elapsed(), None
        summary = {
            "step": self.step,
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
            "wall_s": wall,
            "train_time_s": self.train_time_s,
            "tokens_per_s": session_tokens / max(wall, 1e-9) if self._stop_signal is None else None,
            "tokens": self.tokens_seen,
            "out_dir": str(self.out_dir),
            "interrupted": self._stop_signal is not None,
            "stop_reason": stop_reason,
            "nonfinite_steps": self.nonfinite_total,
        }
        report.event("end", **{k: v for k, v in summary.items() if k not in ("out_dir", "step")})
        report.close()
        return summary

    @property
    def stop_signal(self) -> int | None:
        """The signal (SIGINT, SIGTERM) that stopped :meth:`train` after saving, or None."""
        return self._stop_signal

    def _clock(self) -> float:
        """Seconds on the budget's clock: wall time, or (``time_clock=cpu``) this process's CPU time,
        which other jobs on a shared machine do not inflate (with one thread, it equals the wall
        time of a quiet machine)."""
        return time.process_time() if self.cfg.time_clock == "cpu" else time.time()

    def elapsed(self) -> float:
        """Training time so far on the budget's clock, over every session of the run (seconds)."""
        start = getattr(self, "_session_start", None)
        return self.train_time_s + (self._clock() - start if start is not None else 0.0)

    def lr(self) -> float:
        cfg = self.cfg
        time_frac = self.elapsed() / cfg.max_time_s if cfg.schedule_unit == "time" else None
        return lr_at(
            self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
            total=cfg.decay_steps or cfg.max_steps, schedule=cfg.schedule, decay_frac=cfg.wsd_decay_frac,
            time_frac=time_frac,
        )

    def _profiler(self):
        """torch.profiler over steps 3..2+profile_steps (1 wait, 1 warm-up), traces in <out_dir>/profile."""
        if not self.cfg.profile:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        return profile(
            activities=activities,
            schedule=schedule(wait=1, warmup=1, active=self.cfg.profile_steps, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.out_dir / "profile")),
            record_shapes=True,
            profile_memory=True,
        )

    def close(self) -> None:
        """After a successful :meth:`train`: leave the process group this trainer joined (torchrun)."""
        dist.teardown(self.dist)

    def _early_stop(self, val_loss: float) -> bool:
        """Patience counting (Prechelt 1998): stop after ``early_stop_patience`` evaluations that did
        not beat the best by more than ``early_stop_min_delta``."""
        cfg = self.cfg
        if not cfg.early_stop_patience:
            return False
        if val_loss < self.es_best - cfg.early_stop_min_delta:
            self.es_best, self.es_bad_evals = val_loss, 0
            return False
        self.es_bad_evals += 1
        return self.es_bad_evals >= cfg.early_stop_patience

    def _out_of_memory(self) -> ResourceError:
        """One line for an out-of-memory error in a step: the sizes that set the memory, what to change."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = max(1, cfg.batch_size // 2)
        accum = self.grad_accum * cfg.batch_size // half
        return ResourceError(
            f"out of memory on {self.device} in step {self.step + 1} with micro-batch size {cfg.batch_size}, sequence "
            f"length {self.block_size}, {self.grad_accum} micro-batch(es) per step; try --batch_size={half} "
            f"--grad_accum={accum} (same tokens per step), --grad_checkpointing=true, --dtype=bfloat16 or a "
            f"smaller model; the last checkpoint {self._latest_name()} is intact (resume with --resume)"
        )

    def _skip_step(self, opt, report: RunReport, loss_val: float, norm_val: float) -> None:
        opt.zero_grad(set_to_none=True)
        self.scaler.update()
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        report.event("nonfinite_skip", loss=loss_val, grad_norm=norm_val, in_row=self.nonfinite_in_row,
                     total=self.nonfinite_total)
        if self.nonfinite_in_row >= self.cfg.max_nonfinite:
            raise LmzooError(
                f"{self.nonfinite_in_row} non-finite steps in a row at step {self.step} "
                f"(loss {loss_val}, grad norm {norm_val}): lower lr, or use bfloat16/float32 instead of "
                "float16"
            )


def train(cfg: TrainConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Library entry point: ``lmzoo.train(max_steps=100, model="gpt2-debug")``. ``resume=True`` continues the
    run in ``out_dir`` (default: runs/latest) with its saved settings (:func:`lmzoo.train.rundir.run_config`)."""
    trainer = Trainer(rundir.run_config({**rundir.given_settings(cfg), **overrides}))
    summary = trainer.train()
    trainer.close()
    return summary
