"""``lmzoo finetune``: adapt a pretrained model (lmzoo checkpoint or Hugging Face directory) with the
shared trainer, fully or with LoRA / QLoRA adapters.

    finetune("runs/base", method="lora", target="attn.qkv|attn.proj", r=8,
             source="my.txt", tokenizer="byte", max_steps=200, lr=2e-4, out_dir="runs/ft")

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

from ..errors import ConfigError, LmzooError
from .lora import LoRAConfig, apply_lora, load_adapter, save_adapter, trainable_params
from .qlora import quantize_model


def load_base(path: str | Path, device: str = "cpu"):
    """``(model, tokenizer or None)`` from an lmzoo checkpoint/run directory or an HF directory."""
    from .. import checkpoint as ckpt

    p = Path(path)
    cfg_file = p / "config.json"
    if cfg_file.is_file() and '"family"' not in cfg_file.read_text(errors="replace"):
        from ..convert import from_hf
        from ..tokenizer import load_tokenizer

        model = from_hf(p, device=device)
        try:
            tok = load_tokenizer(p)
        except LmzooError:
            tok = None
        return model, tok
    return ckpt.load(p, device=device), ckpt.load_tokenizer_of(p)


def finetune(
    base: str | Path,
    method: Literal["full", "lora", "qlora"] = "lora",
    target: str = "attn.qkv|attn.proj",
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    freeze: str | None = None,
    adapter: str | Path | None = None,
    **train_overrides: Any,
) -> dict[str, Any]:
    """Fine-tune ``base`` and return the trainer's summary plus ``trainable`` and ``adapter_dir``.

    ``method``: ``full`` (every parameter, except those whose name matches ``freeze``), ``lora`` or
    ``qlora`` (NF4 base). ``train_overrides`` are :class:`lmzoo.TrainConfig` fields (data source,
    tokenizer, max_steps, lr, out_dir, resume...). The data must use the base model's tokenizer.
    """
    from ..train import TrainConfig, Trainer

    if method not in ("full", "lora", "qlora"):
        raise ConfigError(f"finetune method must be full, lora or qlora, got {method!r}")
    model, tok = load_base(base)
    model.train()
    if method == "qlora":
        quantize_model(model, compute_dtype=torch.float32)
    if method in ("lora", "qlora"):
        if adapter:
            load_adapter(model, adapter)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
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
    cfg = TrainConfig.from_dict({"model": "gpt2-debug", **train_overrides})  # model= below replaces the preset
    summary = Trainer(cfg, model=model, tokenizer=tok).train()
    summary = {**summary, "trainable": n}
    if getattr(model, "lora", None):
        summary["adapter_dir"] = str(save_adapter(model, Path(cfg.out_dir) / "adapter"))
    return summary
