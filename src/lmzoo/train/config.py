"""The training configuration: one flat, typed dataclass (YAML recipe + ``--key=value`` overrides).

The model is a preset name plus ``model_args`` overrides (``--model.n_layer=6`` on the command
line); everything else is about the run. Recipes hold run settings, never architecture code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from lmzoo.config import Config, check_parallelism
from lmzoo.errors import ConfigError
from lmzoo.train.optimizers import check_optimizer_args

# Every generator a run seeds takes this range: torch, NumPy's legacy seed, the loaders' (seed, rank, step)
# and the instruction loader's seed * 1,000,003 + step (under 2**64 for any step a run reaches).
SEED_LIMIT = 2**32


@dataclasses.dataclass
class TrainConfig(Config):
    # model
    model: str = "gpt2-char-cpu"  # a preset name (see `lmzoo info --list`)
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # preset overrides
    # data: a prepared data_dir, or a source prepared into it first (neither given: the built-in stdlib corpus)
    source: str | None = None  # corpus to prepare: stdlib, shakespeare, a file, folder, .jsonl, .parquet, owner/name
    input: str | None = None  # local copy of a built-in corpus that would be downloaded (shakespeare)
    tokenizer: str = "char"  # byte | char | bpe | a pretrained tokenizer directory
    vocab_size: int | None = None  # BPE vocabulary size
    data_dir: str | None = None  # a prepared data set; default: data/<source>-<tokenizer>
    # run
    out_dir: str | None = None  # the run directory; default: a new runs/<model>-<time>, linked as runs/latest
    overwrite: bool = False  # replace the run already in out_dir (its checkpoints and logs) instead of refusing
    seed: int = 1337  # initial weights, data order and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest on a busy machine
    # precision (docs/mixed-precision.md)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # compute dtype (autocast)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # weights, grads and AdamW moments
    fp32_norms: bool = True  # norm layers compute in float32 (autocast off inside them)
    tf32: bool = True  # CUDA: float32 matmuls on TF32 tensor cores
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no C++ code generation)
    grad_checkpointing: bool = False  # recompute each block's activations in backward
    memory_check: bool = True  # refuse a model whose estimated memory exceeds the device's (lmzoo.memguard)
    # batch (docs/gradient-accumulation.md)
    batch_size: int = 12  # sequences per micro-batch
    block_size: int | None = None  # context length; default the model's block_size
    grad_accum: int = 1  # micro-batches per optimizer step
    global_batch: int | None = None  # sequences per optimizer step: grad_accum = this / (batch * world)
    batch_ramp_steps: int = 0  # grow micro-batches per step linearly over this many steps (0: off)
    batch_ramp_start: int = 1  # micro-batches per step at step 0 of the ramp
    max_steps: int = 2000  # optimizer steps to train (the run ends there)
    # random: each rank draws its own windows; sequential: consecutive windows split across ranks, so N
    # data-parallel ranks read exactly the rows one process would (the same run at any world size)
    data_order: Literal["random", "sequential"] = "random"
    # segment-level recurrence (Transformer-XL, docs/transformer-xl.md): each row reads a continuous stream
    # (loader mode "stream") and the model's cache (its memory) carries from batch to batch, no gradient
    recurrence: bool = False
    # variants applied from outside the built model (train/variants.py), to compare at equal budget
    multi_token: int = 1  # output heads predicting tokens t+1..t+n (docs/multi-token-prediction.md); 1: off
    bitnet: Literal["off", "b1", "b1.58"] = "off"  # BitLinear attention and MLP projections (docs/bitnet.md)
    max_time_s: float = 0.0  # wall-clock budget incl. the final evaluation (0: none)
    time_clock: Literal["wall", "cpu"] = "wall"  # "cpu": max_time_s counts this process's CPU time
    # optimizer and schedule
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # learning-rate shape (docs/lr-schedules.md)
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    decay_steps: int | None = None  # cosine horizon; default max_steps
    schedule_unit: Literal["steps", "time"] = "steps"  # "time": decay over max_time_s of wall clock
    wsd_decay_frac: float = 0.2  # wsd: the final fraction of the steps that decays to min_lr
    weight_decay: float = 0.1  # decoupled (AdamW) weight decay of the matrices
    decay_embeddings: bool = False  # also decay the embedding weights
    beta1: float = 0.9  # first-moment decay
    beta2: float = 0.99  # second-moment decay
    eps: float = 1e-8  # added to the second-moment root
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # optimizer choice and torch.distributed layout (train/optimizers.py, distributed/)
    optimizer: Literal["adamw", "muon", "ademamix"] = "adamw"  # docs/muon.md
    optimizer_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"scaling": "modded"}
    parallel: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"mode": "ddp"|"fsdp"|"tp"|"pp", ...}
    # evaluation, checkpoints, logging
    eval_interval: int = 250  # evaluate (and checkpoint) every N steps, and at the end (0: only at the end)
    eval_iters: int = 20  # validation batches per evaluation
    ckpt_interval: int = 0  # extra checkpoints every N steps (0: at evaluations and the end)
    keep_last: int = 2  # newest ckpt-<step> directories kept (best/ is kept apart)
    max_nonfinite: int = 5  # abort after this many non-finite steps in a row
    early_stop_patience: int = 0  # stop after this many evaluations without improvement (0: off)
    early_stop_min_delta: float = 0.0  # an improvement must lower val loss by more than this
    resume: bool = False  # continue the run in out_dir from its newest checkpoint, with its saved settings
    progress: bool = True  # a progress bar (loss, tokens/s, ETA) on the terminal
    run_name: str | None = None  # default: the out_dir's name
    tensorboard: bool = False  # event files in <out_dir>/tb (needs the tensorboard package)
    wandb: bool = False  # Weights & Biases (needs wandb; offline by default: no account)
    wandb_project: str = "lmzoo"  # W&B project name
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: logged locally, synced later
    peak_flops: float | None = None  # device peak FLOP/s for MFU (default: the GPU table; CPU: none)
    system_metrics_interval: int = 10  # CUDA memory / NVML readings every N steps
    profile: bool = False  # torch.profiler trace of a few steps into <out_dir>/profile
    profile_steps: int = 3  # steps recorded (after 1 wait and 1 warm-up step)
    sample_tokens: int = 200  # sample printed at the end (0: none)
    sample_prompt: str = "\n"  # the prompt of that sample

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step (one process): global_batch / batch_size, or grad_accum."""
        if self.global_batch:
            return accumulation_steps(self.global_batch, self.batch_size, 1)
        return self.grad_accum

    def validate(self) -> None:
        positive = ["batch_size", "grad_accum", "multi_token", "max_steps", "eval_iters", "keep_last",
                    "max_nonfinite", "batch_ramp_start", "system_metrics_interval", "profile_steps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.multi_token > 64:  # the most a checkpoint may record (lmzoo.load)
            raise ConfigError(f"multi_token must be at most 64, got {self.multi_token}")
        nonneg = ("warmup_steps", "eval_interval", "ckpt_interval", "sample_tokens", "threads",
                  "batch_ramp_steps", "max_time_s", "early_stop_patience", "early_stop_min_delta")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch is not None:
            if self.global_batch <= 0:
                raise ConfigError(f"global_batch must be positive, got {self.global_batch}")
            derived = accumulation_steps(self.global_batch, self.batch_size, 1)
            if self.grad_accum not in (1, derived):
                raise ConfigError(
                    f"grad_accum {self.grad_accum} contradicts global_batch {self.global_batch} / batch_size "
                    f"{self.batch_size} = {derived}; set one of them"
                )
        if self.batch_ramp_steps and self.batch_ramp_start > self.accum_steps:
            raise ConfigError(
                f"batch_ramp_start ({self.batch_ramp_start}) must be <= grad_accum ({self.accum_steps}): "
                "the ramp grows the micro-batches per step up to grad_accum"
            )
        if self.schedule_unit == "time" and not self.max_time_s:
            raise ConfigError("schedule_unit=time decays the learning rate over max_time_s: set max_time_s")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"peak_flops must be positive, got {self.peak_flops}")
        if not self.compile_backend:
            raise ConfigError("compile_backend must name a torch.compile backend (inductor, aot_eager, ...)")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.block_size is not None and self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ConfigError(
                f"decay_steps ({self.decay_steps}) must be larger than warmup_steps ({self.warmup_steps})"
            )
        if not 0.0 <= self.wsd_decay_frac <= 1.0:
            raise ConfigError(f"wsd_decay_frac must be in [0, 1], got {self.wsd_decay_frac}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0 and eps > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"vocab_size must be positive, got {self.vocab_size}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        check_parallelism("threads", self.threads)
        check_optimizer_args(self.optimizer, self.optimizer_args)  # typed and in range, before any run starts
        if self.resume and self.overwrite:
            raise ConfigError("resume continues the run in out_dir, overwrite replaces it: choose one")


def accumulation_steps(global_batch: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``batch_size * world_size * steps == global_batch``."""
    per_pass = batch_size * world_size
    if global_batch % per_pass:
        raise ConfigError(
            f"global_batch {global_batch} is not divisible by batch_size {batch_size} x world size "
            f"{world_size} = {per_pass}; choose a multiple of {per_pass}"
        )
    return global_batch // per_pass


def grad_accum_at(step: int, cfg: TrainConfig, grad_accum: int | None = None) -> int:
    """Micro-batches in optimizer step ``step``: the batch-size ramp, a pure function of the step.

    GPT-3 (Brown et al. 2020, appendix B) grows the batch linearly over the first tokens: early
    gradients are large and agree, so a small batch already points the right way and big batches
    only pay off once the gradient noise dominates (McCandlish et al. 2018, "critical batch size").
    """
    end = grad_accum or cfg.accum_steps  # the full value (the trainer's, for data-parallel runs)
    if not cfg.batch_ramp_steps or step >= cfg.batch_ramp_steps:
        return end
    start = min(cfg.batch_ramp_start, end)
    return start + (end - start) * step // cfg.batch_ramp_steps


def steps_for_tokens(tokens: float, cfg: TrainConfig, block_size: int) -> int:
    """The fewest optimizer steps (at least 1) of one process whose tokens reach ``tokens``, each step
    ``batch_size x block_size x grad_accum_at(step)``: a token (or FLOP) budget turned into
    ``max_steps``, the batch-size ramp's smaller steps counted as they are."""
    per_micro = cfg.batch_size * block_size
    total, n = 0, 0
    while n < cfg.batch_ramp_steps and total < tokens:  # the ramp: its steps one by one
        total += per_micro * grad_accum_at(n, cfg)
        n += 1
    if total < tokens:  # then full steps
        n += math.ceil((tokens - total) / (per_micro * cfg.accum_steps))
    return max(1, n)


def split_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Fold ``model.X=...`` overrides into ``model_args``; other keys stay as TrainConfig fields."""
    out: dict[str, Any] = {}
    model_args: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}  # --parallel.mode=ddp, --optimizer_args.scaling=modded
    for k, v in overrides.items():
        if k.startswith("model."):
            model_args[k[len("model.") :]] = v
        elif k.split(".", 1)[0] in ("parallel", "optimizer_args") and "." in k:
            field, key = k.split(".", 1)
            nested.setdefault(field, {})[key] = v
        else:
            out[k] = v
    if model_args:
        out["model_args"] = {**out.get("model_args", {}), **model_args}
    for field, values in nested.items():
        out[field] = {**out.get(field, {}), **values}
    return out
