"""``lmzoo finetune``: adapt a pretrained model (lmzoo checkpoint or Hugging Face directory) with the
shared trainer, fully or with LoRA / QLoRA adapters, on a text corpus, on instruction data, or from a
teacher (knowledge distillation).

    finetune("runs/base", method="lora", target="mixer", r=8,
             source="my.txt", tokenizer="byte", max_steps=200, lr=2e-4, out_dir="runs/ft")
    finetune("runs/base", instruct="train.jsonl", max_steps=300)         # response-only loss, packed
    finetune("gpt2-debug", teacher="runs/big", kd_alpha=0.5, temperature=2.0, source=...)  # distill

Instruction data goes to the trainer as in-memory loaders of packed rows (``Trainer(data=...)``,
:mod:`lmzoo.peft.instruct`); distillation as a loss hook (``Trainer(loss_fn=...)``,
:class:`lmzoo.peft.distill.DistillLoss`). ``base`` may name a preset instead of a directory: a fresh
student (method ``full``), its vocabulary that of the teacher, or of the instruction tokenizer.

The model is loaded, rewritten from outside (:mod:`lmzoo.peft.lora`, :mod:`lmzoo.peft.qlora`), optionally
partly frozen by a name pattern, and handed to :class:`lmzoo.train.Trainer` (``model=``), which trains
what ``requires_grad`` and checkpoints the whole wrapped model, so ``resume=True`` continues a run. At the
end the adapter alone is written to ``<out_dir>/adapter`` (a few KB-MB); ``adapter=DIR`` starts from a
saved adapter (continue tuning it, or tune it further on other data).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch

from lmzoo.errors import ConfigError
from lmzoo.peft.distill import DistillLoss
from lmzoo.peft.lora import LoRAConfig, apply_lora, load_adapter, save_adapter, trainable_params
from lmzoo.peft.qlora import quantize_model


def _tokenizer_named(name: str):
    """The instruction tokenizer when the base has none saved: ``byte`` or a tokenizer directory."""
    from lmzoo.tokenizer import ByteTokenizer, load_tokenizer

    if name == "byte":
        return ByteTokenizer()
    if Path(name).is_dir():
        return load_tokenizer(name)
    raise ConfigError(
        f"instruction tuning needs a tokenizer: the base (a preset, or a directory without one) has none saved "
        f"and --tokenizer={name} is not byte or a tokenizer directory"
    )


def _check_data_tokenizer(trainer, tok, name: str) -> None:
    """ConfigError when the prepared corpus was tokenized otherwise than the model (or teacher) expects."""
    if tok is None or trainer.data_dir is None:
        return
    from lmzoo.tokenizer import load_tokenizer
    from lmzoo.train.runtime import same_tokenizer

    if not same_tokenizer(load_tokenizer(trainer.data_dir / "tokenizer"), tok):
        raise ConfigError(
            f"the data in {trainer.data_dir} (--tokenizer={name}) is not in the base model's or teacher's tokenizer; "
            "leave out --tokenizer (the base's is the default) or give another --data_dir"
        )


def base_tokenizer_dir(base: str | Path) -> str | None:
    """The directory of the tokenizer saved with a checkpoint, run or Hugging Face directory, or None."""
    from lmzoo.errors import LmzooError
    from lmzoo.formats.checkpoint import resolve

    try:
        d = resolve(base)
    except LmzooError:
        return None
    if (d / "tokenizer").is_dir():
        return str(d / "tokenizer")
    if any((d / name).is_file() for name in ("tokenizer.json", "vocab.json")):  # a Hugging Face directory
        return str(d)
    return None


def _own_run_dir(out_dir: str, base: str | Path) -> None:
    """ConfigError when ``out_dir`` is, or is inside, the base run (or holds it): a fine-tune is a run of its own."""
    out, home = Path(out_dir).resolve(), Path(base).resolve()
    if out == home or home in out.parents or out in home.parents:
        raise ConfigError(
            f"fine-tuning writes a run of its own, and out_dir {out_dir} {'is' if out == home else 'overlaps'} the "
            f"base {base}; choose another --out_dir (default: a new runs/<family>-<method>-<time>)"
        )


def finetune(
    base: str | Path,
    method: Literal["full", "lora", "qlora"] | None = None,
    target: str = "mixer",
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    freeze: str | None = None,
    adapter: str | Path | None = None,
    instruct: str | Path | None = None,
    instruct_val: str | Path | None = None,
    packing: bool = True,
    teacher: str | Path | None = None,
    kd_alpha: float = 0.5,
    temperature: float = 2.0,
    **train_overrides: Any,
) -> dict[str, Any]:
    """Fine-tune ``base`` and return the trainer's summary plus ``trainable`` and ``adapter_dir``.

    ``base``: a checkpoint / run / HF directory, or a preset name (a freshly initialized student).
    ``method``: ``full`` (every parameter, except those whose name matches ``freeze``), ``lora`` or
    ``qlora`` (NF4 base); default ``lora`` for a directory, ``full`` for a preset. ``instruct``: JSONL of
    prompt/response or chat examples (loss on the responses only, packed into ``block_size`` rows;
    ``instruct_val`` or the last 10% held out for validation; ``packing=False``: one example per row).
    ``teacher``: a checkpoint or HF directory; the loss becomes
    ``kd_alpha * CE + (1 - kd_alpha) * temperature^2 * KL``. ``train_overrides`` are :class:`lmzoo.TrainConfig`
    fields (data source, tokenizer, max_steps, lr, out_dir, resume...). The data must use the base model's
    (and the teacher's) tokenizer, the default for a base that saved one. The run is a directory of its own:
    ``out_dir`` (never the base's) or a new ``runs/<family>-<method>-<time>`` linked as ``runs/latest``.
    The summary's ``signal`` names the signal that stopped training (after saving), or None.
    """
    from lmzoo.common import resolve_device
    from lmzoo.formats.load import load_any
    from lmzoo.models import PRESETS, build
    from lmzoo.peft.instruct import instruct_loaders
    from lmzoo.train import Trainer, rundir
    from lmzoo.train.trainer import seed_everything

    if not instruct and (instruct_val or not packing):
        raise ConfigError("instruct_val / packing=False (--instruct-val / --no-packing) need instruction data "
                          "(instruct= / --instruct)")
    fresh = str(base) in PRESETS and not Path(base).exists()
    method = method or ("full" if fresh else "lora")
    if method not in ("full", "lora", "qlora"):
        raise ConfigError(f"finetune method must be full, lora or qlora, got {method!r}")
    if fresh and (method != "full" or adapter):
        raise ConfigError(f"{base} is a preset: a fresh model trains fully (method full, no adapter)")
    if not fresh and not instruct and not train_overrides.get("resume") and "tokenizer" not in train_overrides:
        tok_dir = base_tokenizer_dir(base)  # the corpus is tokenized as the base model reads it
        train_overrides = {**train_overrides, **({"tokenizer": tok_dir} if tok_dir else {})}
    # a directory's model replaces the preset (model= below); a preset base is the preset trained
    cfg = rundir.run_config({"model": "gpt2-debug", **train_overrides, **({"model": str(base)} if fresh else {})})
    if not fresh and cfg.out_dir is not None:
        _own_run_dir(cfg.out_dir, base)
    t_model, tok = load_any(teacher) if teacher else (None, None)
    if fresh and t_model is None and not instruct:  # plain training of a preset: the trainer builds it
        if freeze:
            raise ConfigError("freeze= needs a base checkpoint or a teacher/instruction data")
        trainer = Trainer(cfg)
        return {**trainer.train(), "trainable": trainable_params(trainer.model), "method": "full",
                "signal": trainer.stop_signal}
    if fresh:
        tok = tok or (_tokenizer_named(cfg.tokenizer) if instruct else None)
        vocab = t_model.config.vocab_size if t_model is not None else tok.vocab_size
        args = {"vocab_size": vocab, **({"block_size": cfg.block_size} if cfg.block_size else {}), **cfg.model_args}
        seed_everything(cfg.seed)  # the same initial weights as `lmzoo train` of this preset and seed
        model = build(str(base), **args)
    else:
        model, base_tok = load_any(base)
        tok = base_tok or tok or (_tokenizer_named(cfg.tokenizer) if instruct else None)
    loss_fn = DistillLoss(t_model, kd_alpha, temperature, student=model) if t_model is not None else None
    model.train()
    if method == "qlora":
        quantize_model(model, compute_dtype=torch.float32)
    if method in ("lora", "qlora"):
        if adapter:
            load_adapter(model, adapter)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            seed_everything(cfg.seed)  # A's random initialization follows `seed`, like a fresh model's weights
            apply_lora(model, LoRAConfig(target, r, alpha, dropout))
    elif adapter:
        raise ConfigError("adapter= continues LoRA/QLoRA tuning; method=full has no adapter")
    if freeze:
        pattern = re.compile(freeze)
        for name, p in model.named_parameters():
            if pattern.search(name):
                p.requires_grad_(False)
    n = trainable_params(model)
    if n == 0:
        raise ConfigError(f"nothing left to train (freeze={freeze!r} matches every trainable parameter)")
    data = None
    if instruct:
        block = cfg.block_size or model.config.block_size
        data = instruct_loaders(tok, instruct, block, cfg.batch_size, val=instruct_val, seed=cfg.seed,
                                device=resolve_device(cfg.device), packing=packing)
    linked = cfg.out_dir is None
    if linked:  # a new run directory of its own, never the base's
        label = f"{base if fresh else model.family}-{method}"
        cfg = cfg.replace(out_dir=str(rundir.default_out_dir(label)))
    trainer = Trainer(cfg, model=model, tokenizer=tok, data=data, loss_fn=loss_fn)
    _check_data_tokenizer(trainer, tok, cfg.tokenizer)
    if linked:
        rundir.claim(trainer.out_dir, link=True)
    summary = trainer.train()
    summary = {**summary, "trainable": n, "method": method, "signal": trainer.stop_signal}
    if getattr(model, "lora", None):
        summary["adapter_dir"] = str(save_adapter(model, Path(cfg.out_dir) / "adapter"))
    return summary
