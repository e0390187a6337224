"""The training configuration: one flat, typed dataclass (YAML recipe + ``--key=value`` overrides).

The model is a preset name plus ``model_args`` overrides (``--model.n_layer=6`` on the command
line); everything else is about the run. Recipes hold run settings, never architecture code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ..config import Config
from ..errors import ConfigError


@dataclasses.dataclass
class TrainConfig(Config):
    # model
    model: str = "gpt2-char-cpu"  # a preset name (see `lmzoo info --list`)
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # preset overrides
    # data: a prepared directory, or a source prepared on first use
    source: str = "stdlib"  # built-in corpus name or a path (file, folder, .jsonl, .parquet)
    input: str | None = None  # local copy for a built-in corpus that would be downloaded
    tokenizer: str = "char"  # byte | char | bpe | a pretrained tokenizer directory
    vocab_size: int | None = None  # BPE vocabulary size
    data_dir: str | None = None  # default: data/<source>-<tokenizer>
    # run
    out_dir: str = "runs/default"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    # batch
    batch_size: int = 12  # sequences per micro-batch
    block_size: int | None = None  # context length; default the model's block_size
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000
    # optimizer and schedule
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine horizon; default max_steps
    wsd_decay_frac: float = 0.2
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # evaluation, checkpoints, logging
    eval_interval: int = 250
    eval_iters: int = 20
    ckpt_interval: int = 0  # extra checkpoints every N steps (0: at evaluations and the end)
    keep_last: int = 2
    max_nonfinite: int = 5  # abort after this many non-finite steps in a row
    resume: bool = False
    progress: bool = True
    sample_tokens: int = 200  # sample printed at the end (0: none)
    sample_prompt: str = "\n"

    def validate(self) -> None:
        positive = ["batch_size", "grad_accum", "max_steps", "eval_iters", "keep_last", "max_nonfinite"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.block_size is not None and self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(f"decay_steps must be positive, got {self.decay_steps}")
        if not 0.0 <= self.wsd_decay_frac <= 1.0:
            raise ConfigError(f"wsd_decay_frac must be in [0, 1], got {self.wsd_decay_frac}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0 and eps > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"vocab_size must be positive, got {self.vocab_size}")


def split_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Fold ``model.X=...`` overrides into ``model_args``; other keys stay as TrainConfig fields."""
    out: dict[str, Any] = {}
    model_args: dict[str, Any] = {}
    for k, v in overrides.items():
        if k.startswith("model."):
            model_args[k[len("model.") :]] = v
        else:
            out[k] = v
    if model_args:
        out["model_args"] = {**out.get("model_args", {}), **model_args}
    return out
