"""Parameter-efficient fine-tuning, applied from outside a model (never by subclassing it).

- :mod:`lmzoo.peft.lora`: LoRA adapters injected by module-name pattern; merge/unmerge; save/load;
  export to Hugging Face ``peft``'s adapter format.
- :mod:`lmzoo.quant.nf4` / :mod:`lmzoo.peft.qlora`: 4-bit NormalFloat weights with double quantization,
  LoRA on top (QLoRA).
- :mod:`lmzoo.peft.instruct`: instruction tuning (prompt/response and chat JSONL, response-only loss, packing).
- :mod:`lmzoo.peft.distill`: knowledge distillation (Hinton et al. 2015; Kim & Rush 2016).
- :mod:`lmzoo.peft.finetune`: ``lmzoo finetune``: all of the above through the shared trainer.
"""

from __future__ import annotations

from lmzoo.peft.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    export_merged_hf,
    export_peft,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_params,
    unmerge_lora,
)
from lmzoo.peft.qlora import apply_qlora, memory_report, quantize_model

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "apply_qlora",
    "export_merged_hf",
    "export_peft",
    "load_adapter",
    "memory_report",
    "merge_lora",
    "quantize_model",
    "save_adapter",
    "trainable_params",
    "unmerge_lora",
]
