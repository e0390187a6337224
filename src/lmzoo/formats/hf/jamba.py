"""Hugging Face ``JambaForCausalLM`` <-> lmzoo ``Jamba``: the config map and the key map, both ways.

HF names without the ``model.`` prefix ({i} = layer, {e} = expert, {p} = a Mamba parameter):

| Hugging Face                                           | lmzoo                                                |
|--------------------------------------------------------|------------------------------------------------------|
| ``embed_tokens.weight``                                | ``embed.weight``                                     |
| ``layers.{i}.input_layernorm.weight``                  | ``blocks.{i}.mixer_norm.weight``                     |
| ``layers.{i}.self_attn.{q,k,v}_proj.weight``           | ``blocks.{i}.mixer.qkv.weight`` (q; k; v)            |
| ``layers.{i}.self_attn.o_proj.weight``                 | ``blocks.{i}.mixer.proj.weight``                     |
| ``layers.{i}.mamba.{p}``                               | ``blocks.{i}.mixer.{p}``                             |
| ``layers.{i}.mamba.{dt,b,c}_layernorm.weight``         | ``blocks.{i}.mixer.{dt,B,C}_norm.weight``            |
| ``layers.{i}.pre_ff_layernorm.weight``                 | ``blocks.{i}.ffn_norm.weight``                       |
| ``layers.{i}.feed_forward.{gate,up,down}_proj.weight`` | ``blocks.{i}.ffn.{gate,up,down}.weight``             |
| ``layers.{i}.feed_forward.router.weight``              | ``blocks.{i}.ffn.router.weight``                     |
| ``layers.{i}.feed_forward.experts.{e}.{g,u,d}``        | ``blocks.{i}.ffn.experts.{e}.{gate,up,down}.weight`` |
| ``final_layernorm.weight``                             | ``norm.weight``                                      |
| ``lm_head.weight`` (absent when tied)                  | ``head.weight``                                      |

``{g,u,d}``: ``gate_proj.weight``, ``up_proj.weight``, ``down_proj.weight``.
``{p}``: in_proj, conv1d, x_proj, dt_proj, out_proj (weights and biases), A_log, D. Files hold the
per-expert layout above (the released checkpoint's, and what transformers 5 writes); transformers
5's in-memory fused ``feed_forward.experts.gate_up_proj`` (E, 2I, C) / ``down_proj`` (E, C, I) is
read too. The layer pattern maps one to one: ``attn_layer_period/offset`` = ``attn_every/offset``,
``expert_layer_period/offset`` = ``moe_every/offset``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.hf.decoder import NO_TOKEN_IDS, DecoderLayout, qkv_rows
from lmzoo.models.jamba import JambaConfig

MAMBA_PARAMS = (
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
    "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias",
)
# (HF name without "model.", lmzoo name): templates with {i} layer, {e} expert, {p} a Mamba parameter
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("embed_tokens.weight", "embed.weight"),
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.mixer_norm.weight"),
    ("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.mixer.proj.weight"),
    ("layers.{i}.mamba.{p}", "blocks.{i}.mixer.{p}"),
    ("layers.{i}.mamba.dt_layernorm.weight", "blocks.{i}.mixer.dt_norm.weight"),
    ("layers.{i}.mamba.b_layernorm.weight", "blocks.{i}.mixer.B_norm.weight"),
    ("layers.{i}.mamba.c_layernorm.weight", "blocks.{i}.mixer.C_norm.weight"),
    ("layers.{i}.pre_ff_layernorm.weight", "blocks.{i}.ffn_norm.weight"),
    ("layers.{i}.feed_forward.gate_proj.weight", "blocks.{i}.ffn.gate.weight"),
    ("layers.{i}.feed_forward.up_proj.weight", "blocks.{i}.ffn.up.weight"),
    ("layers.{i}.feed_forward.down_proj.weight", "blocks.{i}.ffn.down.weight"),
    ("layers.{i}.feed_forward.router.weight", "blocks.{i}.ffn.router.weight"),
    ("layers.{i}.feed_forward.experts.{e}.gate_proj.weight", "blocks.{i}.ffn.experts.{e}.gate.weight"),
    ("layers.{i}.feed_forward.experts.{e}.up_proj.weight", "blocks.{i}.ffn.experts.{e}.up.weight"),
    ("layers.{i}.feed_forward.experts.{e}.down_proj.weight", "blocks.{i}.ffn.experts.{e}.down.weight"),
    ("final_layernorm.weight", "norm.weight"),
)
FUSED_EXPERTS = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


LAYOUT = DecoderLayout(KEY_MAP, FUSED_EXPERTS, "Jamba", params=MAMBA_PARAMS)


class JambaConverter:
    """The converter registered for ``model_type == "jamba"`` (see :mod:`lmzoo.formats.hf`)."""

    family = "jamba"
    model_types = ("jamba",)
    architectures = ("JambaForCausalLM",)

    def config_from_hf(self, hf: Mapping[str, Any]) -> JambaConfig:
        """An HF ``JambaConfig`` dict (missing keys: its defaults, Jamba v0.1's shapes) -> JambaConfig.

        Raises CheckpointError for what lmzoo's Jamba does not compute: another activation than
        SiLU, or a head_dim other than hidden_size / num_attention_heads.
        """
        d = {k: v for k, v in hf.items() if v is not None}
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act={d['hidden_act']!r} is not supported (lmzoo's Jamba: silu)")
        n_embd, n_head = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
        if d.get("head_dim", n_embd // n_head) != n_embd // n_head:
            raise CheckpointError(f"head_dim={d['head_dim']} is not hidden_size / num_attention_heads")
        n_experts = d.get("num_experts", d.get("num_local_experts", 16))
        rank = d.get("mamba_dt_rank", "auto")
        return JambaConfig(
            vocab_size=d.get("vocab_size", 65536),
            n_layer=d.get("num_hidden_layers", 32),
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads", 8),
            mlp_hidden=d.get("intermediate_size", 14336),
            attn_every=d.get("attn_layer_period", 8),
            attn_offset=d.get("attn_layer_offset", 4),
            moe_every=d.get("expert_layer_period", 2),
            moe_offset=d.get("expert_layer_offset", 1),
            n_experts=n_experts if n_experts > 1 else 0,  # one "expert" is transformers' dense MLP
            n_experts_per_tok=d.get("num_experts_per_tok", 2),
            moe_aux_weight=d.get("router_aux_loss_coef", 0.001),
            d_state=d.get("mamba_d_state", 16),
            d_conv=d.get("mamba_d_conv", 4),
            expand=d.get("mamba_expand", 2),
            dt_rank=math.ceil(n_embd / 16) if rank == "auto" else int(rank),
            conv_bias=d.get("mamba_conv_bias", True),
            ssm_bias=d.get("mamba_proj_bias", False),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=d.get("tie_word_embeddings", False),
            dropout=d.get("attention_dropout", 0.0),
            init_std=d.get("initializer_range", 0.02),
        )

    def config_to_hf(self, cfg: JambaConfig) -> dict[str, Any]:
        """JambaConfig -> an HF ``JambaConfig`` dict; ConfigError for a layout transformers lacks."""
        if cfg.n_experts == 1:
            raise ConfigError("cannot export as Hugging Face Jamba: n_experts=1 (transformers: dense)")
        return {
            "model_type": "jamba",
            "architectures": ["JambaForCausalLM"],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.mlp_hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "attn_layer_period": cfg.attn_every,
            "attn_layer_offset": cfg.attn_offset,
            "expert_layer_period": cfg.moe_every,
            "expert_layer_offset": cfg.moe_offset,
            "num_experts": cfg.n_experts or 1,
            "num_experts_per_tok": cfg.n_experts_per_tok if cfg.n_experts else 1,
            "router_aux_loss_coef": cfg.moe_aux_weight,
            "mamba_d_state": cfg.d_state,
            "mamba_d_conv": cfg.d_conv,
            "mamba_expand": cfg.expand,
            "mamba_dt_rank": cfg.dt_rank or math.ceil(cfg.n_embd / 16),
            "mamba_conv_bias": cfg.conv_bias,
            "mamba_proj_bias": cfg.ssm_bias,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": cfg.dropout,
            "initializer_range": cfg.init_std,
            "max_position_embeddings": 262144,  # nothing in the model depends on it
            **NO_TOKEN_IDS,
        }

    def state_from_hf(
        self, tensors: Iterable[tuple[str, torch.Tensor]], cfg: JambaConfig, expected: Mapping[str, tuple[int, ...]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream of HF ``(name, tensor)`` -> lmzoo ``(name, tensor)`` (:meth:`DecoderLayout.state_from_hf`)."""
        describe = (f"n_layer={cfg.n_layer}, layer pattern attention {cfg.attn_offset}/{cfg.attn_every}, "
                    f"MoE {cfg.moe_offset}/{cfg.moe_every}")
        return LAYOUT.state_from_hf(tensors, expected, _qkv_rows(cfg), cfg.n_embd, cfg.n_experts, cfg.mlp_hidden,
                                    describe)

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], cfg: JambaConfig
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` pairs of a Jamba state dict: qkv split, experts apart, a tied head once."""
        return LAYOUT.state_to_hf(state, _qkv_rows(cfg), cfg.tie_embeddings)


def _qkv_rows(cfg: JambaConfig) -> dict[str, int]:
    return qkv_rows(cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head)
