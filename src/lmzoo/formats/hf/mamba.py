"""Hugging Face ``MambaForCausalLM`` <-> lmzoo ``Mamba``: the config map and the key map, both ways.

lmzoo's mixer keeps the parameter names of the reference implementation (``in_proj``,
``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), which are also the
checkpoints' names, so the conversion is a renaming with no reshaping:

| Hugging Face (``backbone.`` prefix)                       | lmzoo                            |
|-----------------------------------------------------------|----------------------------------|
| ``embeddings.weight`` (older files: ``embedding.weight``) | ``embed.weight``                 |
| ``layers.{i}.norm.weight``                                | ``blocks.{i}.mixer_norm.weight`` |
| ``layers.{i}.mixer.{param}``                              | ``blocks.{i}.mixer.{param}``     |
| ``norm_f.weight``                                         | ``norm.weight``                  |
| ``lm_head.weight`` (no prefix; absent when tied)          | ``head.weight``                  |

``{param}``: ``in_proj.weight``, ``in_proj.bias``, ``conv1d.weight`` (d_inner, 1, d_conv),
``conv1d.bias``, ``x_proj.weight``, ``dt_proj.weight``, ``dt_proj.bias``, ``A_log``, ``D``,
``out_proj.weight``, ``out_proj.bias``.

``residual_in_fp32`` (the released models' True) only changes bf16/fp16 rounding of the residual
stream; it is accepted and ignored. Initialization fields (``time_step_*``) map to lmzoo's init.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.hf.decoder import HEAD, LM_HEAD, NO_TOKEN_IDS
from lmzoo.formats.tensors import check_shape
from lmzoo.models.mamba import MambaConfig

PREFIX = "backbone."
MIXER_PARAMS = (
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
    "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias",
)
_FROM_HF: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^embeddings?\.weight$"), "embed.weight"),
    (re.compile(r"^layers\.(\d+)\.norm\.weight$"), "blocks.{}.mixer_norm.weight"),
    (re.compile(r"^layers\.(\d+)\.mixer\.(" + "|".join(map(re.escape, MIXER_PARAMS)) + ")$"),
     "blocks.{}.mixer.{}"),
    (re.compile(r"^norm_f\.weight$"), "norm.weight"),
)
_TO_HF: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^embed\.weight$"), "embeddings.weight"),
    (re.compile(r"^blocks\.(\d+)\.mixer_norm\.weight$"), "layers.{}.norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.mixer\.(.+)$"), "layers.{}.mixer.{}"),
    (re.compile(r"^norm\.weight$"), "norm_f.weight"),
)


def _rename(name: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.format(*m.groups())
    return None


class MambaConverter:
    """The converter registered for ``model_type == "mamba"`` (see :mod:`lmzoo.formats.hf`)."""

    family = "mamba"
    model_types = ("mamba",)
    architectures = ("MambaForCausalLM", "MambaModel")

    def config_from_hf(self, hf: Mapping[str, Any]) -> MambaConfig:
        """An HF ``MambaConfig`` dict (missing keys take its defaults) -> lmzoo MambaConfig.

        Raises CheckpointError for what lmzoo's mixer does not compute: another activation than
        SiLU, or an ``intermediate_size`` other than ``expand * hidden_size``.
        """
        hidden = hf.get("hidden_size", 768)
        expand = hf.get("expand", 2)
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (lmzoo's Mamba: silu)")
        inter = hf.get("intermediate_size", expand * hidden)
        if inter != expand * hidden:
            raise CheckpointError(f"intermediate_size={inter} != expand * hidden_size = {expand * hidden}")
        rank = hf.get("time_step_rank", "auto")
        return MambaConfig(
            vocab_size=hf.get("vocab_size", 50280),
            n_layer=hf.get("num_hidden_layers", 32),
            n_embd=hidden,
            d_state=hf.get("state_size", 16),
            d_conv=hf.get("conv_kernel", 4),
            expand=expand,
            dt_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
            conv_bias=hf.get("use_conv_bias", True),
            bias=hf.get("use_bias", False),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dt_min=hf.get("time_step_min", 0.001),
            dt_max=hf.get("time_step_max", 0.1),
        )

    def config_to_hf(self, cfg: MambaConfig) -> dict[str, Any]:
        """MambaConfig -> an HF ``MambaConfig`` dict. Token ids belong to a tokenizer: written as null."""
        return {
            "model_type": "mamba",
            "architectures": ["MambaForCausalLM"],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.d_inner,
            "num_hidden_layers": cfg.n_layer,
            "state_size": cfg.d_state,
            "conv_kernel": cfg.d_conv,
            "expand": cfg.expand,
            "time_step_rank": cfg.dt_rank or math.ceil(cfg.n_embd / 16),
            "use_conv_bias": cfg.conv_bias,
            "use_bias": cfg.bias,
            "hidden_act": "silu",
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "residual_in_fp32": True,
            "time_step_min": cfg.dt_min,
            "time_step_max": cfg.dt_max,
            **NO_TOKEN_IDS,
        }

    def state_from_hf(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        cfg: MambaConfig,
        expected: Mapping[str, tuple[int, ...]],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Rename a stream of HF tensors; CheckpointError names a tensor that maps nowhere or mis-fits."""
        for hf_name, t in tensors:
            name = HEAD if hf_name == LM_HEAD else _rename(hf_name.removeprefix(PREFIX), _FROM_HF)
            if name is None:
                raise CheckpointError(f"unexpected tensor {hf_name!r} in a Mamba checkpoint")
            if name not in expected:
                raise CheckpointError(
                    f"unexpected tensor {hf_name!r}: the model (n_layer={cfg.n_layer}, bias={cfg.bias}, "
                    f"conv_bias={cfg.conv_bias}) has no {name!r}"
                )
            check_shape(hf_name, t, expected[name])
            yield name, t

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], cfg: MambaConfig
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` pairs of a Mamba state dict; a tied head is stored once."""
        for name, t in state.items():
            if name == HEAD:
                if not cfg.tie_embeddings:
                    yield LM_HEAD, t.contiguous()
                continue
            hf = _rename(name, _TO_HF)
            if hf is None:
                raise ConfigError(f"lmzoo tensor {name!r} has no Mamba counterpart")
            yield PREFIX + hf, t.contiguous()
