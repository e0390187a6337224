"""Turn a pretrained Transformer into an Infini-attention model, from outside the model.

    base = lmzoo.from_hf("path/to/llama")               # or any lmzoo GPT-2 / Llama model
    model = to_infini(base, segment=512)                # same weights + one gate per head and layer
    lmzoo.train(...)                                    # then fine-tune on sequences of many segments

Infini-attention (layers/infini_attention.py) keeps each attention layer's ``qkv`` and ``proj``
unchanged and adds a gate ``beta`` per head; the compressive memory itself has no parameters
(it is built from the layer's own keys and values). So the conversion is: switch the config's
``attention`` to ``"infini"``, build that model, copy every tensor across, initialize the gates.

Within the first segment the memory is empty and the layer is exactly the original softmax
attention, so the converted model's logits on any input of at most ``segment`` tokens equal the
original's. From the second segment on each query attends only inside its segment and mixes in
``sigmoid(beta)`` of the memory read-out: ``gate_init`` sets where that mix starts.
"""

from __future__ import annotations

import torch

from lmzoo.errors import ConfigError
from lmzoo.models import build_model
from lmzoo.models.base import LanguageModel


def to_infini(
    model: LanguageModel, segment: int, delta_rule: bool = False, gate_init: float = 0.0
) -> LanguageModel:
    """A new model of ``model``'s family with Infini-attention in every layer and ``model``'s weights.

    ``segment``: tokens per segment (local softmax attention inside, memory across). ``delta_rule``:
    the delta-rule memory update. ``gate_init``: initial beta of every head (memory share sigmoid(beta)).
    """
    if "infini_segment" not in model.config.field_names():
        raise ConfigError(f"the {model.family} family has no Infini-attention option")
    if getattr(model.config, "attention", "softmax") != "softmax":
        raise ConfigError(f"to_infini converts softmax attention, this model has attention={model.config.attention}")
    cfg = model.config.replace(
        attention="infini", infini_segment=segment, infini_delta_rule=delta_rule, infini_gate_init=gate_init
    )
    with torch.device(model.device):
        new = build_model(model.family, cfg).to(model.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("mixer.gate") for k in missing):
        raise ConfigError(f"to_infini: weights do not carry over (missing {missing}, unexpected {unexpected})")
    return new.train(model.training)
