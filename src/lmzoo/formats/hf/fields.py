"""Type checks of a Hugging Face ``config.json`` before a converter reads it.

The converters read HF keys with ``dict.get`` and pass them on (to an lmzoo config, to ``int()``,
to a division). A hand-edited or foreign config with ``"hidden_size": "64"``, ``"num_attention_heads":
0`` or ``"time_step_rank": 2.5`` would then fail deep inside with a traceback, or worse, be coerced
into a model other than the one the file describes. :func:`check_fields` refuses such a value first,
with a one-line :class:`~lmzoo.errors.CheckpointError` naming the key.

The tables hold HF key names; a key means the same in every family that has it, so one table serves
all converters. Only keys present are checked (missing ones take the converter's defaults), and
``null`` is left to the converter (most read it as "the default"; the lmzoo config refuses the rest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lmzoo.errors import CheckpointError

POSITIVE_INT = frozenset({
    "vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "n_inner", "max_position_embeddings",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
    "head_dim", "sliding_window", "num_experts_per_tok", "state_size", "conv_kernel", "expand",
    "attn_layer_period", "expert_layer_period", "mamba_d_state", "mamba_d_conv", "mamba_expand",
})
NON_NEGATIVE_INT = frozenset({"num_local_experts", "num_experts", "attn_layer_offset", "expert_layer_offset"})
INT_OR_AUTO = frozenset({"time_step_rank", "mamba_dt_rank"})  # "auto": ceil(hidden_size / 16)
NUMBER = frozenset({
    "layer_norm_epsilon", "rms_norm_eps", "rope_theta", "resid_pdrop", "embd_pdrop", "attn_pdrop",
    "attention_dropout", "initializer_range", "router_aux_loss_coef", "time_step_min", "time_step_max",
})
POSITIVE_NUMBER = frozenset({"rope_theta", "layer_norm_epsilon", "rms_norm_eps"})
BOOL = frozenset({
    "tie_word_embeddings", "use_conv_bias", "use_bias", "mamba_conv_bias", "mamba_proj_bias", "attention_bias",
    "mlp_bias", "use_sliding_window", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn", "add_cross_attention",
})
STRING = frozenset({"activation_function", "hidden_act"})
MAPPING = frozenset({"rope_scaling", "rope_parameters"})


def is_int(v: Any) -> bool:
    """An integer, or a float with an integral value (``32.0``: JSON writers differ; HF accepts it)."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def problem(key: str, v: Any) -> str | None:
    """Why ``v`` is not a valid value of HF key ``key`` (None when it is, or the key is not known)."""
    if v is None:
        return None
    if key in POSITIVE_INT and not (is_int(v) and v > 0):
        return "expected a positive integer"
    if key in NON_NEGATIVE_INT and not (is_int(v) and v >= 0):
        return "expected a non-negative integer"
    if key in INT_OR_AUTO and v != "auto" and not (is_int(v) and v > 0):
        return 'expected a positive integer or "auto"'
    if key in NUMBER and not is_number(v):
        return "expected a finite number"
    if key in POSITIVE_NUMBER and not v > 0:
        return "expected a positive number"
    if key in BOOL and not isinstance(v, bool):
        return "expected true or false"
    if key in STRING and not isinstance(v, str):
        return "expected a string"
    if key in MAPPING and not isinstance(v, dict):
        return "expected a mapping (or null)"
    return None


def check_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``hf`` with its integer keys' integral floats made ints (``64.0`` -> ``64``); CheckpointError
    ``<key>=<value>: expected ...`` for the first ill-typed value of a known key."""
    out = dict(hf)
    for key, v in hf.items():
        why = problem(key, v)
        if why:
            raise CheckpointError(f"{key}={v!r}: {why}")
        if isinstance(v, float) and key in POSITIVE_INT | NON_NEGATIVE_INT | INT_OR_AUTO:
            out[key] = int(v)
    return out
