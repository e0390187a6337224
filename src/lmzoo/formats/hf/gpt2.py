"""Hugging Face ``GPT2LMHeadModel`` <-> lmzoo ``GPT``: the config map and the key map, both ways.

The conversion is a renaming (GPT-2's names to the part names every lmzoo family shares: the table
below) plus two details of how OpenAI's code (and so ``transformers``) stores the weights:

1. **Conv1D.** The projections are ``Conv1D`` modules, which compute ``x @ W + b`` with ``W``
   stored as ``(in, out)``; ``nn.Linear`` stores ``(out, in)`` and computes ``x @ W.T + b``.
   Those four weights are transposed on the way in and back on the way out.
2. **Fused QKV.** ``attn.c_attn`` is one projection to ``3 * n_embd`` features: all query heads,
   then all key heads, then all value heads, each head ``head_dim`` wide and in head order.
   That is exactly lmzoo's ``mixer.qkv`` layout for ``n_kv_head == n_head``: no reshuffling.

| Hugging Face (``transformer.`` prefix optional) | lmzoo                                   | conversion        |
|-------------------------------------------------|-----------------------------------------|-------------------|
| ``wte.weight``                                  | ``embed.weight``                        |                   |
| ``wpe.weight``                                  | ``pos_embed.weight``                    |                   |
| ``h.{i}.ln_1.{weight,bias}``                    | ``blocks.{i}.mixer_norm.*``             |                   |
| ``h.{i}.attn.c_attn.weight`` (C, 3C)            | ``blocks.{i}.mixer.qkv.weight`` (3C, C) | transpose         |
| ``h.{i}.attn.c_attn.bias``                      | ``blocks.{i}.mixer.qkv.bias``           |                   |
| ``h.{i}.attn.c_proj.weight`` (C, C)             | ``blocks.{i}.mixer.proj.weight``        | transpose         |
| ``h.{i}.attn.c_proj.bias``                      | ``blocks.{i}.mixer.proj.bias``          |                   |
| ``h.{i}.ln_2.{weight,bias}``                    | ``blocks.{i}.ffn_norm.*``               |                   |
| ``h.{i}.mlp.c_fc.weight`` (C, H)                | ``blocks.{i}.ffn.fc.weight`` (H, C)     | transpose         |
| ``h.{i}.mlp.c_fc.bias``                         | ``blocks.{i}.ffn.fc.bias``              |                   |
| ``h.{i}.mlp.c_proj.weight`` (H, C)              | ``blocks.{i}.ffn.proj.weight`` (C, H)   | transpose         |
| ``h.{i}.mlp.c_proj.bias``                       | ``blocks.{i}.ffn.proj.bias``            |                   |
| ``ln_f.{weight,bias}``                          | ``norm.*``                              |                   |
| ``lm_head.weight`` (never prefixed)             | ``head.weight``                         | omitted when tied |
| ``h.{i}.attn.bias``, ``h.{i}.attn.masked_bias`` | (ignored: old mask buffers)             |                   |

Configs that lmzoo's GPT cannot compute exactly are refused with a one-line CheckpointError
rather than loaded into a model that would silently differ.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.hf.decoder import HEAD, LM_HEAD, NO_TOKEN_IDS
from lmzoo.formats.tensors import check_shape
from lmzoo.models.gpt2 import GPTConfig

# (HF name without the "transformer." prefix, lmzoo name, stored as Conv1D (in, out)); {i} = layer.
KEY_MAP: tuple[tuple[str, str, bool], ...] = (
    ("wte.weight", "embed.weight", False),
    ("wpe.weight", "pos_embed.weight", False),
    ("h.{i}.ln_1.weight", "blocks.{i}.mixer_norm.weight", False),
    ("h.{i}.ln_1.bias", "blocks.{i}.mixer_norm.bias", False),
    ("h.{i}.attn.c_attn.weight", "blocks.{i}.mixer.qkv.weight", True),
    ("h.{i}.attn.c_attn.bias", "blocks.{i}.mixer.qkv.bias", False),
    ("h.{i}.attn.c_proj.weight", "blocks.{i}.mixer.proj.weight", True),
    ("h.{i}.attn.c_proj.bias", "blocks.{i}.mixer.proj.bias", False),
    ("h.{i}.ln_2.weight", "blocks.{i}.ffn_norm.weight", False),
    ("h.{i}.ln_2.bias", "blocks.{i}.ffn_norm.bias", False),
    ("h.{i}.mlp.c_fc.weight", "blocks.{i}.ffn.fc.weight", True),
    ("h.{i}.mlp.c_fc.bias", "blocks.{i}.ffn.fc.bias", False),
    ("h.{i}.mlp.c_proj.weight", "blocks.{i}.ffn.proj.weight", True),
    ("h.{i}.mlp.c_proj.bias", "blocks.{i}.ffn.proj.bias", False),
    ("ln_f.weight", "norm.weight", False),
    ("ln_f.bias", "norm.bias", False),
)
PREFIX = "transformer."  # GPT2LMHeadModel nests GPT2Model under it; GPT2Model's own keys lack it
IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights

# HF activation_function -> lmzoo mlp. gelu_new, gelu_fast and gelu_pytorch_tanh are three
# spellings of the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
# HF switches whose non-default value changes what the attention computes.
REQUIRED = {
    "scale_attn_weights": True,  # False: no 1/sqrt(head_dim) scaling of the scores
    "scale_attn_by_inverse_layer_idx": False,  # scores also divided by (layer + 1)
    "reorder_and_upcast_attn": False,  # a different (upcast) order of the score computation
    "add_cross_attention": False,  # encoder-decoder cross-attention layers
}


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_FROM_HF = [(_compile(hf), lm, conv1d) for hf, lm, conv1d in KEY_MAP]
_TO_HF = [(_compile(lm), hf, conv1d) for hf, lm, conv1d in KEY_MAP]


def _fill(pattern: str, m: re.Match[str]) -> str:
    return pattern.replace("{i}", m.group(1)) if m.groups() else pattern


def hf_to_lmzoo_name(hf_name: str) -> tuple[str, bool] | None:
    """``(lmzoo name, is Conv1D)`` of an HF tensor name; None for an ignored buffer.

    Raises CheckpointError for a name that is neither (an unexpected tensor).
    """
    if hf_name == LM_HEAD:
        return HEAD, False
    name = hf_name.removeprefix(PREFIX)
    if IGNORED.match(name):
        return None
    for pattern, lm, conv1d in _FROM_HF:
        m = pattern.match(name)
        if m:
            return _fill(lm, m), conv1d
    raise CheckpointError(
        f"unexpected tensor {hf_name!r} in a GPT-2 checkpoint (not part of GPT2LMHeadModel)"
    )


def lmzoo_to_hf_name(name: str) -> tuple[str, bool]:
    """``(HF name with the "transformer." prefix, is Conv1D)`` of an lmzoo GPT tensor name."""
    if name == HEAD:
        return LM_HEAD, False
    for pattern, hf, conv1d in _TO_HF:
        m = pattern.match(name)
        if m:
            return PREFIX + _fill(hf, m), conv1d
    raise CheckpointError(f"lmzoo tensor {name!r} has no GPT-2 counterpart")


class GPT2Converter:
    """The converter registered for ``model_type == "gpt2"`` (see :mod:`lmzoo.formats.hf`)."""

    family = "gpt2"
    model_types = ("gpt2",)
    architectures = ("GPT2LMHeadModel", "GPT2Model")

    def config_from_hf(self, hf: Mapping[str, Any]) -> GPTConfig:
        """An HF ``GPT2Config`` dict (missing keys take GPT2Config's defaults) -> GPTConfig.

        Raises CheckpointError for a setting lmzoo's GPT cannot compute exactly. Dropout:
        lmzoo has one rate where GPT-2 has three (resid, embd, attn, all 0.1 in the
        released models); ``resid_pdrop`` is taken. It only matters in training mode.
        """
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise CheckpointError(
                f"activation_function={act!r} has no lmzoo equivalent (supported: {', '.join(ACTIVATIONS)})"
            )
        for key, needed in REQUIRED.items():
            if hf.get(key, needed) != needed:
                raise CheckpointError(
                    f"{key}={hf[key]!r} is not supported by lmzoo's GPT (it needs {needed})"
                )
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=hf.get("n_positions", 1024),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_kv_head=None,
            n_embd=hf.get("n_embd", 768),
            mlp=ACTIVATIONS[act],
            mlp_hidden=hf.get("n_inner"),  # None = 4 * n_embd in both libraries
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            pos_emb="learned",
            bias=True,
            dropout=hf.get("resid_pdrop", 0.1),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02),
        )

    def config_to_hf(self, cfg: GPTConfig) -> dict[str, Any]:
        """GPTConfig -> an HF ``GPT2Config`` dict, or ConfigError naming every field GPT-2 lacks.

        Token ids (bos/eos/pad) belong to a tokenizer, which lmzoo's config does not know: they
        are written as null; set them in the exported config if ``generate`` should stop.
        """
        problems = []
        if cfg.pos_emb != "learned":
            problems.append(f"pos_emb={cfg.pos_emb!r} (GPT-2 has a learned position table: 'learned')")
        if cfg.norm != "layernorm":
            problems.append(f"norm={cfg.norm!r} (GPT-2 uses 'layernorm')")
        if cfg.mlp not in ("gelu", "gelu_tanh"):
            problems.append(f"mlp={cfg.mlp!r} (GPT-2's MLP is 'gelu' or 'gelu_tanh')")
        if not cfg.bias:
            problems.append("bias=False (GPT-2 has biases in every linear layer and norm)")
        if cfg.n_kv_head != cfg.n_head:
            problems.append(
                f"n_kv_head={cfg.n_kv_head} != n_head={cfg.n_head} (GPT-2 has no grouped-query attention)"
            )
        if cfg.attention != "softmax":
            problems.append(f"attention={cfg.attention!r} (GPT-2 computes softmax attention)")
        if cfg.kv_share_every != 1:
            problems.append(f"kv_share_every={cfg.kv_share_every} (every GPT-2 layer has its own keys and values)")
        if cfg.n_experts:
            problems.append(f"n_experts={cfg.n_experts} (GPT-2 has a dense MLP)")
        if cfg.padded_vocab_size != cfg.vocab_size:  # the padding rows have no place in HF's config
            problems.append(f"vocab_multiple={cfg.vocab_multiple} pads the vocabulary (export needs 1)")
        if problems:
            raise ConfigError("cannot export as Hugging Face GPT-2: " + "; ".join(problems))
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "n_inner": cfg.mlp_hidden,
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings,
            **NO_TOKEN_IDS,
            **REQUIRED,
        }

    def state_from_hf(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        cfg: GPTConfig,
        expected: Mapping[str, tuple[int, ...]],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Rename and transpose a stream of HF tensors into ``(lmzoo name, tensor)`` pairs.

        ``expected`` holds the lmzoo model's tensor shapes. A tensor that maps to no lmzoo name
        (e.g. a layer past ``n_layer``) or has the wrong shape raises CheckpointError naming the
        HF tensor and both shapes, in the checkpoint's own (in, out) layout for Conv1D weights.
        """
        for hf_name, t in tensors:
            mapped = hf_to_lmzoo_name(hf_name)
            if mapped is None:
                continue
            name, conv1d = mapped
            if name not in expected:
                raise CheckpointError(
                    f"unexpected tensor {hf_name!r}: the model (n_layer={cfg.n_layer}) has no {name!r}"
                )
            shape = tuple(expected[name])
            if conv1d:
                check_shape(hf_name, t, shape[::-1], " (Conv1D weights are stored as (in, out))")
                t = t.t().contiguous()  # (in, out) -> nn.Linear's (out, in); the HF copy is dropped
            else:
                check_shape(hf_name, t, shape)
            yield name, t

    def ignores(self, hf_name: str) -> bool:
        """True for the causal-mask buffers old checkpoints hold (uint8 or bool in some)."""
        return bool(IGNORED.match(hf_name.removeprefix(PREFIX)))

    def source_name(self, name: str) -> str:
        """The HF tensor an lmzoo name comes from (for naming missing tensors)."""
        return lmzoo_to_hf_name(name)[0]

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], cfg: GPTConfig
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` pairs of a GPT state dict; a tied head is stored once (as wte)."""
        for name, t in state.items():
            if name == HEAD and cfg.tie_embeddings:
                continue  # transformers re-ties it from transformer.wte.weight
            hf_name, conv1d = lmzoo_to_hf_name(name)
            yield hf_name, (t.t() if conv1d else t).contiguous()
