"""Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``MixtralForCausalLM`` <-> lmzoo ``Llama``.

The three architectures are one lmzoo family; the HF ``model_type`` picks the config fields
(Mistral: ``sliding_window``; Mixtral: ``num_local_experts``...). Tensors, HF names without the
``model.`` prefix ({i} = layer, {e} = expert):

| Hugging Face                                          | lmzoo                                      | conversion  |
|-------------------------------------------------------|--------------------------------------------|-------------|
| ``embed_tokens.weight``                               | ``embed.weight``                           |             |
| ``layers.{i}.input_layernorm.weight``                 | ``blocks.{i}.mixer_norm.weight``           |             |
| ``layers.{i}.self_attn.{q,k,v}_proj.weight``          | ``blocks.{i}.mixer.qkv.weight``            | q; k; v cat |
| ``layers.{i}.self_attn.o_proj.weight``                | ``blocks.{i}.mixer.proj.weight``           |             |
| ``layers.{i}.post_attention_layernorm.weight``        | ``blocks.{i}.ffn_norm.weight``             |             |
| ``layers.{i}.mlp.{gate,up,down}_proj.weight``         | ``blocks.{i}.ffn.{gate,up,down}.weight``   |             |
| ``layers.{i}.block_sparse_moe.gate.weight``           | ``blocks.{i}.ffn.router.weight``           |             |
| ``layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` | ``blocks.{i}.ffn.experts.{e}.gate.weight`` |             |
| ``layers.{i}.block_sparse_moe.experts.{e}.w3.weight`` | ``blocks.{i}.ffn.experts.{e}.up.weight``   |             |
| ``layers.{i}.block_sparse_moe.experts.{e}.w2.weight`` | ``blocks.{i}.ffn.experts.{e}.down.weight`` |             |
| ``norm.weight``                                       | ``norm.weight``                            |             |
| ``lm_head.weight`` (absent when tied)                 | ``head.weight``                            |             |

Mixtral files use the per-expert ``block_sparse_moe`` layout above (what the released checkpoints
hold and what ``save_pretrained`` of transformers 5 still writes). transformers 5 keeps experts
in memory fused as ``mlp.experts.gate_up_proj`` (E, 2I, C) and ``mlp.experts.down_proj``
(E, C, I), with the router at ``mlp.gate``; that layout is read too (split per expert). Export
writes the per-expert layout.

**RoPE layout.** Meta's original checkpoints rotate adjacent channel pairs (2j, 2j+1); the HF
checkpoints were converted with a fixed permutation of the q/k rows to the "rotate half" layout
(pairs j, j + d/2), which is lmzoo's. So HF weights load without permuting;
:func:`meta_to_rotate_half` is that permutation, for weights from Meta's own ``consolidated.pth``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.hf.decoder import NO_TOKEN_IDS, PREFIX, DecoderLayout, qkv_rows
from lmzoo.formats.hf.fields import is_int, is_number
from lmzoo.models.llama import LlamaConfig

# (HF name without "model.", lmzoo name); {i} layer, {e} expert. The first HF name of an lmzoo name is
# the one export writes; later ones are aliases only read.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("embed_tokens.weight", "embed.weight"),
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.mixer_norm.weight"),
    ("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.mixer.proj.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ffn_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "blocks.{i}.ffn.gate.weight"),
    ("layers.{i}.mlp.up_proj.weight", "blocks.{i}.ffn.up.weight"),
    ("layers.{i}.mlp.down_proj.weight", "blocks.{i}.ffn.down.weight"),
    ("layers.{i}.block_sparse_moe.gate.weight", "blocks.{i}.ffn.router.weight"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "blocks.{i}.ffn.experts.{e}.gate.weight"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "blocks.{i}.ffn.experts.{e}.up.weight"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "blocks.{i}.ffn.experts.{e}.down.weight"),
    ("layers.{i}.mlp.gate.weight", "blocks.{i}.ffn.router.weight"),  # transformers 5's in-memory name
    ("norm.weight", "norm.weight"),
)
FUSED_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
IGNORED = re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # a buffer some old .bin files hold

# Values of the HF config classes' defaults that matter, for config.json files that omit keys.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(intermediate_size=11008, num_key_value_heads=None, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, rope_theta=10000.0),
    "mistral": dict(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096),
    "mixtral": dict(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, num_local_experts=8,
                    num_experts_per_tok=2, router_aux_loss_coef=0.001),
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"
}
ROPE_TYPES = ("default", "linear", "yarn")  # what lmzoo computes exactly; "dynamic", "llama3"... are refused


LAYOUT = DecoderLayout(KEY_MAP, FUSED_EXPERTS, "Llama/Mistral/Mixtral", ignored=IGNORED)


def meta_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q or k projection rows (n_heads * hd, C) from Meta's interleaved RoPE pairs (2j, 2j+1)
    to the rotate-half pairs (j, j + hd/2) of HF and lmzoo (transformers' convert_llama_weights_to_hf)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`meta_to_rotate_half`: rotate-half rows back to interleaved pairs (the layout
    llama.cpp's GGUF files keep)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_number(src: str, scaling: Mapping[str, Any], key: str, default: Any = None, integer: bool = False) -> Any:
    """``scaling[key]`` checked to be a positive number (an integer when ``integer``), else ``default``;
    CheckpointError naming ``<src>.<key>`` for anything else (a string, a list, zero...)."""
    v = scaling.get(key)
    if v is None:
        if default is None:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            raise CheckpointError(f"{src}.{key} is missing (rope type {rope_type!r} needs it)")
        return default
    ok = is_int(v) if integer else is_number(v)
    if not ok or v <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise CheckpointError(f"{src}.{key}={v!r}: expected {what}")
    return int(v) if integer else float(v)


def _rope_from_hf(hf: Mapping[str, Any], default_theta: float) -> dict[str, Any]:
    """lmzoo rope fields from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4).

    Every value read is type-checked: a missing ``factor``, a string where a number belongs... is a
    one-line CheckpointError naming the key (``rope_scaling.factor``), never a traceback."""
    params = dict(hf.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("per-layer-type rope_parameters are not supported by lmzoo's Llama")
    legacy = dict(hf.get("rope_scaling") or {})
    src_theta = "rope_parameters" if "rope_theta" in params else None
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    if theta is None:
        theta = default_theta  # null: the default, as for the other keys
    if not is_number(theta) or theta <= 0:
        raise CheckpointError(f"{src_theta + '.' if src_theta else ''}rope_theta={theta!r}: expected a positive number")
    use_params = "rope_type" in params or "type" in params
    scaling, src = (params, "rope_parameters") if use_params else (legacy, "rope_scaling")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"partial_rotary_factor={partial} is not supported (lmzoo rotates all)")
    out: dict[str, Any] = dict(rope_theta=float(theta))
    if rope_type == "linear":
        out.update(rope_scaling="linear", rope_factor=_rope_number(src, scaling, "factor"))
    elif rope_type == "yarn":
        for key in ("mscale", "mscale_all_dim"):
            if scaling.get(key):
                raise CheckpointError(f"yarn with {key} is not supported (DeepSeek's variant)")
        if scaling.get("truncate", True) is False:
            raise CheckpointError("yarn with truncate=false is not supported")
        attention_factor = scaling.get("attention_factor")
        if attention_factor is not None:
            attention_factor = _rope_number(src, scaling, "attention_factor")
        out.update(
            rope_scaling="yarn",
            rope_factor=_rope_number(src, scaling, "factor"),
            rope_original_max=_rope_number(
                src, scaling, "original_max_position_embeddings", hf["max_position_embeddings"], integer=True
            ),
            rope_beta_fast=_rope_number(src, scaling, "beta_fast", 32.0),
            rope_beta_slow=_rope_number(src, scaling, "beta_slow", 1.0),
            rope_attention_factor=attention_factor,
        )
    return out


class LlamaConverter:
    """The converter registered for ``model_type`` llama, mistral and mixtral (see :mod:`lmzoo.formats.hf`)."""

    family = "llama"
    model_types = ("llama", "mistral", "mixtral")
    architectures = tuple(ARCHITECTURES.values())

    def config_from_hf(self, hf: Mapping[str, Any]) -> LlamaConfig:
        """An HF Llama/Mistral/Mixtral config dict -> LlamaConfig (missing keys: HF's defaults).

        Raises CheckpointError for what lmzoo's Llama cannot compute exactly: biases, another
        activation, a RoPE variant other than default/linear/yarn. ``router_jitter_noise``
        (multiplicative input noise while training) is not implemented and is ignored.
        """
        model_type = hf.get("model_type") or next(
            (t for t, a in ARCHITECTURES.items() if a in (hf.get("architectures") or [])), "llama"
        )
        # null values take the default too, except sliding_window, where null means "no window"
        given = {k: v for k, v in hf.items() if v is not None or k == "sliding_window"}
        d = {**HF_DEFAULTS[model_type], **given}
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act={d['hidden_act']!r} is not supported (lmzoo's Llama: silu)")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise CheckpointError(f"{key}=true is not supported (lmzoo's Llama has no biases)")
        n_embd, n_head = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
        head_dim = d.get("head_dim")
        sliding = d.get("sliding_window") if model_type in ("mistral", "mixtral") else None
        if d.get("use_sliding_window") is False:
            sliding = None
        return LlamaConfig(
            vocab_size=d.get("vocab_size", 32000),
            block_size=d["max_position_embeddings"],
            n_layer=d.get("num_hidden_layers", 32),
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            head_dim=head_dim,  # None: n_embd // n_head
            mlp_hidden=d["intermediate_size"],
            norm_eps=d["rms_norm_eps"],
            sliding_window=sliding,
            n_experts=d.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            n_experts_per_tok=d.get("num_experts_per_tok", 2),
            moe_aux_weight=d.get("router_aux_loss_coef", 0.02),
            tie_embeddings=d.get("tie_word_embeddings", False),
            dropout=d.get("attention_dropout", 0.0),
            init_std=d.get("initializer_range", 0.02),
            **_rope_from_hf(d, HF_DEFAULTS[model_type]["rope_theta"]),
        )

    def config_to_hf(self, cfg: LlamaConfig) -> dict[str, Any]:
        """LlamaConfig -> an HF config dict: Mixtral if it has experts, Mistral if it has a window,
        else Llama. ConfigError naming every field the HF architecture lacks."""
        problems = []
        if cfg.window_pattern and set(cfg.window_pattern) != {"L"}:
            problems.append(f"window_pattern={cfg.window_pattern!r} (Mistral/Mixtral window every layer)")
        if cfg.attention != "softmax":
            problems.append(f"attention={cfg.attention!r} (Llama computes softmax attention)")
        if cfg.rope_scaling == "ntk":
            problems.append("rope_scaling='ntk' (transformers has only its dynamic form; use linear or yarn)")
        if problems:
            raise ConfigError("cannot export as a Hugging Face Llama/Mistral/Mixtral: " + "; ".join(problems))
        model_type = "mixtral" if cfg.n_experts else ("mistral" if cfg.sliding_window else "llama")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling == "linear":
            rope.update(rope_type="linear", factor=cfg.rope_factor)
        elif cfg.rope_scaling == "yarn":
            rope.update(
                rope_type="yarn", factor=cfg.rope_factor,
                beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                original_max_position_embeddings=cfg.rope_original_max or cfg.block_size,
                attention_factor=cfg.rope_attention_factor,
            )
        out: dict[str, Any] = {
            "model_type": model_type,
            "architectures": [ARCHITECTURES[model_type]],
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.block_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": cfg.dropout,
            "initializer_range": cfg.init_std,
            **NO_TOKEN_IDS,
        }
        if model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:
            out["sliding_window"] = cfg.sliding_window
        if model_type == "mixtral":
            out.update(
                num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                router_aux_loss_coef=cfg.moe_aux_weight, router_jitter_noise=0.0, output_router_logits=False,
            )
        return out

    def state_from_hf(
        self, tensors: Iterable[tuple[str, torch.Tensor]], cfg: LlamaConfig, expected: Mapping[str, tuple[int, ...]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream of HF ``(name, tensor)`` -> lmzoo ``(name, tensor)`` (:meth:`DecoderLayout.state_from_hf`)."""
        return LAYOUT.state_from_hf(tensors, expected, _qkv_rows(cfg), cfg.n_embd, cfg.n_experts, cfg.hidden,
                                    f"n_layer={cfg.n_layer}, n_experts={cfg.n_experts}")

    def ignores(self, hf_name: str) -> bool:
        """True for the ``rotary_emb.inv_freq`` buffers some old ``.bin`` files hold."""
        return bool(IGNORED.match(hf_name.removeprefix(PREFIX)))

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], cfg: LlamaConfig
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` pairs of a Llama state dict: qkv split, experts apart, tied head once."""
        return LAYOUT.state_to_hf(state, _qkv_rows(cfg), cfg.tie_embeddings)


def _qkv_rows(cfg: LlamaConfig) -> dict[str, int]:
    return qkv_rows(cfg.n_head, cfg.n_kv_head, cfg.head_dim)
