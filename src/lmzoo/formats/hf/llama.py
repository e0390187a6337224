"""Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``MixtralForCausalLM`` <-> lmzoo ``Llama``.

The three architectures are one lmzoo family; the HF ``model_type`` picks the config fields
(Mistral: ``sliding_window``; Mixtral: ``num_local_experts``...). Tensors, HF names without the
``model.`` prefix ({i} = layer, {e} = expert):

| Hugging Face                                        | lmzoo                                 | conversion  |
|-----------------------------------------------------|---------------------------------------|-------------|
| ``embed_tokens.weight``                             | ``wte.weight``                        |            |
| ``layers.{i}.input_layernorm.weight``               | ``blocks.{i}.attn_norm.weight``       |            |
| ``layers.{i}.self_attn.{q,k,v}_proj.weight``        | ``blocks.{i}.attn.qkv.weight``        | q; k; v cat |
| ``layers.{i}.self_attn.o_proj.weight``              | ``blocks.{i}.attn.proj.weight``       |            |
| ``layers.{i}.post_attention_layernorm.weight``      | ``blocks.{i}.mlp_norm.weight``        |            |
| ``layers.{i}.mlp.{gate,up,down}_proj.weight``       | ``blocks.{i}.mlp.{gate,up,down}.weight`` |         |
| ``layers.{i}.block_sparse_moe.gate.weight``         | ``blocks.{i}.mlp.router.weight``      |            |
| ``layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` | ``blocks.{i}.mlp.experts.{e}.gate.weight`` |      |
| ``layers.{i}.block_sparse_moe.experts.{e}.w3.weight`` | ``blocks.{i}.mlp.experts.{e}.up.weight``   |      |
| ``layers.{i}.block_sparse_moe.experts.{e}.w2.weight`` | ``blocks.{i}.mlp.experts.{e}.down.weight`` |      |
| ``norm.weight``                                     | ``norm_f.weight``                     |            |
| ``lm_head.weight`` (absent when tied)               | ``lm_head.weight``                    |            |

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
from lmzoo.formats.hf.fields import is_int, is_number
from lmzoo.formats.tensors import check_shape, split_fused_experts
from lmzoo.models.llama import LlamaConfig

PREFIX = "model."
LM_HEAD = "lm_head.weight"
# (HF name without "model.", lmzoo name); {i} layer, {e} expert. The first HF name of an lmzoo name is
# the one export writes; later ones are aliases only read.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("embed_tokens.weight", "wte.weight"),
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
    ("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.proj.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate.weight"),
    ("layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up.weight"),
    ("layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight"),
    ("layers.{i}.block_sparse_moe.gate.weight", "blocks.{i}.mlp.router.weight"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "blocks.{i}.mlp.experts.{e}.gate.weight"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "blocks.{i}.mlp.experts.{e}.up.weight"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "blocks.{i}.mlp.experts.{e}.down.weight"),
    ("layers.{i}.mlp.gate.weight", "blocks.{i}.mlp.router.weight"),  # transformers 5's in-memory name
    ("norm.weight", "norm_f.weight"),
)
QKV = re.compile(r"^layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")
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


def _compile(pattern: str) -> re.Pattern[str]:
    p = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + p + "$")


def _fill(pattern: str, m: re.Match[str]) -> str:
    for key, value in m.groupdict().items():
        pattern = pattern.replace("{" + key + "}", value)
    return pattern


_FROM_HF = [(_compile(hf), lm) for hf, lm in KEY_MAP]
_TO_HF: dict[str, tuple[re.Pattern[str], str]] = {}
for _hf, _lm in KEY_MAP:
    _TO_HF.setdefault(_lm, (_compile(_lm), _hf))  # the first HF name wins


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
            "bos_token_id": None,  # token ids belong to the tokenizer, which the config does not know
            "eos_token_id": None,
            "pad_token_id": None,
            "use_cache": True,
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
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        cfg: LlamaConfig,
        expected: Mapping[str, tuple[int, ...]],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream of HF ``(name, tensor)`` -> lmzoo ``(name, tensor)``; shape errors name the HF tensor.

        q, k and v of a layer are held until all three have arrived (they are neighbours in the
        files), then fused; a fused expert tensor is split into per-expert copies and dropped.
        """
        hd = cfg.head_dim
        qkv_rows = {"q": cfg.n_head * hd, "k": cfg.n_kv_head * hd, "v": cfg.n_kv_head * hd}
        pending: dict[str, dict[str, torch.Tensor]] = {}  # lmzoo qkv name -> the pieces seen so far
        for hf_name, t in tensors:
            name = hf_name if hf_name == LM_HEAD else hf_name.removeprefix(PREFIX)
            if IGNORED.match(name):
                continue
            if m := QKV.match(name):
                target = f"blocks.{m.group(1)}.attn.qkv.weight"
                if target not in expected:
                    raise CheckpointError(
                        f"unexpected tensor {hf_name!r}: the model has {cfg.n_layer} layers"
                    )
                check_shape(hf_name, t, (qkv_rows[m.group(2)], cfg.n_embd))
                parts = pending.setdefault(target, {})
                parts[m.group(2)] = t
                if len(parts) == 3:
                    yield target, torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
                    del pending[target]
                continue
            if m := FUSED_EXPERTS.match(name):
                yield from self._split_experts(hf_name, int(m.group(1)), m.group(2), t, cfg, expected)
                continue
            lm = LM_HEAD if name == LM_HEAD else None
            for pattern, target in _FROM_HF:
                if lm is None and (mm := pattern.match(name)):
                    lm = _fill(target, mm)
            if lm is None:
                raise CheckpointError(f"unexpected tensor {hf_name!r} (not in a Llama/Mistral/Mixtral model)")
            if lm not in expected:
                raise CheckpointError(
                    f"unexpected tensor {hf_name!r}: the model "
                    f"(n_layer={cfg.n_layer}, n_experts={cfg.n_experts}) "
                    f"has no {lm!r}"
                )
            check_shape(hf_name, t, expected[lm])
            yield lm, t
        if pending:
            missing = [f"model.layers.{n.split('.')[1]}.self_attn.{p}_proj.weight"
                       for n, parts in pending.items() for p in "qkv" if p not in parts]
            raise CheckpointError(f"missing tensor(s) {', '.join(missing[:5])}")

    def ignores(self, hf_name: str) -> bool:
        """True for the ``rotary_emb.inv_freq`` buffers some old ``.bin`` files hold."""
        return bool(IGNORED.match(hf_name.removeprefix(PREFIX)))

    @staticmethod
    def _split_experts(hf_name, layer, kind, t, cfg, expected) -> Iterator[tuple[str, torch.Tensor]]:
        if f"blocks.{layer}.mlp.router.weight" not in expected:
            raise CheckpointError(f"unexpected tensor {hf_name!r}: the model has no experts in layer {layer}")
        prefix = f"blocks.{layer}.mlp.experts"
        yield from split_fused_experts(hf_name, kind, t, prefix, cfg.n_experts, cfg.hidden, cfg.n_embd)

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], cfg: LlamaConfig
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` pairs of a Llama state dict: qkv split, experts apart, tied head once."""
        hd = cfg.head_dim
        for name, t in state.items():
            if name == LM_HEAD:
                if not cfg.tie_embeddings:
                    yield LM_HEAD, t.contiguous()
                continue
            if name.endswith(".attn.qkv.weight"):
                layer = name.split(".")[1]
                q, k, v = t.split([cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd], dim=0)
                for p, piece in zip("qkv", (q, k, v)):  # clone: safetensors refuses tensors sharing memory
                    yield f"{PREFIX}layers.{layer}.self_attn.{p}_proj.weight", piece.clone()
                continue
            yield PREFIX + lmzoo_to_hf_name(name), t.contiguous()


def lmzoo_to_hf_name(name: str) -> str:
    """The HF name (without ``model.``) an lmzoo Llama tensor is exported under (per-expert layout)."""
    for pattern, hf in _TO_HF.values():
        if m := pattern.match(name):
            return _fill(hf, m)
    raise CheckpointError(f"lmzoo tensor {name!r} has no Llama/Mistral/Mixtral counterpart")
