"""The GGUF architectures lmzoo reads and writes, as maps onto Hugging Face's names and configs.

A GGUF file names its architecture (``general.architecture``), keeps the config as metadata under
that prefix (``llama.block_count``...) and names tensors llama.cpp's way (``blk.0.attn_q.weight``).
Each :class:`Arch` here translates both into the Hugging Face terms of lmzoo's converters
(:mod:`lmzoo.formats.hf`): the metadata becomes a ``config.json``-style dict, each GGUF tensor an HF
tensor. From there the HF converter builds the lmzoo config and the lmzoo tensors, so lmzoo's own
parameter names appear nowhere in this package.

Tensor tables: ``(GGUF name, HF name, shape)`` with ``{i}`` the layer, ``{e}`` the expert, and the
shape in torch order over symbols of the config (V vocabulary, C width, Q = heads x head_dim,
K = KV heads x head_dim, I feed-forward width, E experts, P positions). Every tensor of a file is
checked against its shape *before* any tensor is read.

Layout conventions (docs/gguf.md):

- **llama: Q/K rows.** llama.cpp rotates adjacent channel pairs (2j, 2j+1) of each head (Meta's
  original layout); Hugging Face and lmzoo rotate the halves (j, j + d/2). llama.cpp's converter
  therefore permutes the rows of ``attn_q`` and ``attn_k`` per head; reading undoes it
  (:func:`lmzoo.formats.hf.llama.meta_to_rotate_half`, with the KV head count for ``attn_k``),
  writing redoes it.
- **gpt2: Conv1D.** HF's GPT-2 stores its four projections as (in, out); GGUF as (out, in).
- **Experts** are stacked in one (E, ...) tensor per kind in GGUF, one tensor each in HF.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.gguf.reader import GGUFFile
from lmzoo.formats.hf.llama import meta_to_rotate_half, rotate_half_to_meta

# A context longer than this is refused: lmzoo precomputes RoPE tables of that length, and a file's
# metadata must not make it allocate more than the file holds. 16M tokens is above any released model.
MAX_CONTEXT = 1 << 24
LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Row:
    gguf: str
    hf: str
    shape: tuple[str, ...]
    transpose: bool = False  # HF stores it transposed (GPT-2's Conv1D: (in, out)); ``shape`` is GGUF's
    quantize: bool = True  # False: kept in F32 when writing a quantized file (llama.cpp's choice)


def _pattern(name: str) -> re.Pattern[str]:
    p = re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + p + "$")


def _fill(pattern: str, **values: Any) -> str:
    for k, v in values.items():
        pattern = pattern.replace("{" + k + "}", str(v))
    return pattern


class Arch:
    """What one GGUF architecture needs: metadata <-> HF config, tensor names and shapes both ways."""

    name: str = ""
    rows: tuple[Row, ...] = ()
    # GGUF tensors a file may hold that lmzoo cannot use, with the reason (refused by name)
    refused: Mapping[str, str] = {}

    def __init__(self) -> None:
        self._by_gguf = [(_pattern(r.gguf), r) for r in self.rows]
        self._by_hf = [(_pattern(r.hf), r) for r in self.rows]

    # -- reading -------------------------------------------------------------------------------------
    def hf_config(self, f: GGUFFile) -> dict[str, Any]:
        """The HF config dict the file's metadata describes (types checked; see :func:`meta_int`)."""
        raise NotImplementedError

    def dims(self, hf: Mapping[str, Any]) -> dict[str, int]:
        """The shape symbols' values for an HF config."""
        raise NotImplementedError

    def row(self, gguf_name: str) -> tuple[Row, dict[str, str]]:
        for pattern, r in self._by_gguf:
            if m := pattern.match(gguf_name):
                return r, m.groupdict()
        reason = next((why for pre, why in self.refused.items() if gguf_name.startswith(pre)), None)
        if reason:
            raise CheckpointError(f"tensor {gguf_name!r} is not supported: {reason}")
        raise CheckpointError(f"unexpected tensor {gguf_name!r} (not part of a {self.name} model)")

    def check_tensors(self, f: GGUFFile, hf: Mapping[str, Any]) -> None:
        """Every tensor known, of the right shape, and none missing: all before reading any data."""
        dims = self.dims(hf)
        seen: set[str] = set()
        for name, info in f.tensors.items():
            r, groups = self.row(name)
            want = tuple(dims[s] for s in r.shape)  # GGUF's own (torch-order) shape
            if "{e}" in r.hf:  # experts stacked in one tensor: (E, ...)
                want = (dims["E"], *want)
            if info.shape != want:
                raise CheckpointError(f"tensor {name!r} ({info.type_name}) has shape {list(info.shape)}, "
                                      f"the metadata implies {list(want)}")
            seen.add(r.gguf if "i" not in groups else r.gguf.replace("{i}", groups["i"]))
        missing = [n for n in self.required(hf) if n not in seen]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"missing tensor(s) {', '.join(missing[:5])}{more}")

    def required(self, hf: Mapping[str, Any]) -> list[str]:
        """GGUF names the file must hold."""
        raise NotImplementedError

    def to_hf(self, name: str, t: torch.Tensor, hf: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        """A GGUF tensor -> HF ``(name, tensor)`` pairs (several for stacked experts)."""
        r, groups = self.row(name)
        t = self.unpermute(r, t, hf)
        if r.transpose:
            t = t.t().contiguous()
        if "{e}" in r.hf:
            for e in range(t.shape[0]):
                yield _fill(r.hf, e=e, **groups), t[e].clone()  # clone: a view would keep the stack alive
        else:
            yield _fill(r.hf, **groups), t

    def unpermute(self, r: Row, t: torch.Tensor, hf: Mapping[str, Any]) -> torch.Tensor:
        return t

    # -- writing -------------------------------------------------------------------------------------
    def metadata(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """GGUF metadata (``{arch}.*`` keys, Python values typed by :mod:`.writer`) of an HF config."""
        raise NotImplementedError

    def from_hf(self, tensors: Iterable[tuple[str, torch.Tensor]],
                hf: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor, Row]]:
        """HF ``(name, tensor)`` pairs -> ``(GGUF name, tensor, row)``; experts are stacked."""
        experts: dict[str, dict[int, torch.Tensor]] = {}
        n_experts = self.dims(hf).get("E", 0)
        for hf_name, t in tensors:
            r = m = None
            for pattern, row in self._by_hf:
                if m := pattern.match(hf_name):
                    r = row
                    break
            if r is None or m is None:
                raise ConfigError(f"tensor {hf_name!r} has no place in a GGUF {self.name} model")
            groups = m.groupdict()
            if r.transpose:
                t = t.t()
            if "e" in groups:
                target = _fill(r.gguf, i=groups["i"])
                parts = experts.setdefault(target, {})
                parts[int(groups["e"])] = t
                if len(parts) == n_experts:
                    yield target, torch.stack([parts[e] for e in range(n_experts)]), r
                    del experts[target]
                continue
            yield _fill(r.gguf, **groups), self.permute(r, t.contiguous(), hf), r

    def permute(self, r: Row, t: torch.Tensor, hf: Mapping[str, Any]) -> torch.Tensor:
        return t


def meta_value(f: GGUFFile, key: str, kind: str, default: Any = None) -> Any:
    """Metadata ``key`` checked to be of ``kind`` (``int``: a positive integer; ``count``: an integer >= 0;
    ``float``: a positive finite number; ``str``). Missing: ``default``, or a CheckpointError when the
    default is None. The error names the key and the value."""
    import math

    v = f.get(key)
    if v is None:
        if default is None:
            raise CheckpointError(f"{f.path}: metadata {key} is missing")
        return default
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "count": isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
        "str": isinstance(v, str),
    }[kind]
    if not ok:
        what = {"int": "a positive integer", "count": "an integer >= 0", "float": "a positive number",
                "str": "a string"}[kind]
        raise CheckpointError(f"{f.path}: metadata {key}={str(v)[:60]}: expected {what}")
    return v


def meta_context(f: GGUFFile, arch: str) -> int:
    """``{arch}.context_length``, refused beyond :data:`MAX_CONTEXT`."""
    context = meta_value(f, f"{arch}.context_length", "int")
    if context > MAX_CONTEXT:
        raise CheckpointError(f"{f.path}: metadata {arch}.context_length={context:,} is beyond {MAX_CONTEXT:,} tokens")
    return context


def meta_vocab(f: GGUFFile, arch: str) -> int | None:
    """``{arch}.vocab_size``; older files: the vocabulary's length, or the embedding's rows."""
    vocab = f.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens, emb = f.get("tokenizer.ggml.tokens"), f.tensors.get("token_embd.weight")
        vocab = len(tokens) if tokens is not None else emb.shape[0] if emb is not None else None
    return vocab


def check_layers(f: GGUFFile, n_layer: int, key: str) -> None:
    """The block count the metadata claims must be the one the tensors hold (checked before anything
    is built: a claim of 10^9 layers would otherwise build 10^9 modules)."""
    present = {int(m.group(1)) for name in f.tensors if (m := LAYER.match(name))}
    whole = len(present) == max(present, default=-1) + 1  # 0..n-1, compared without building range(n_layer)
    if not (whole and len(present) == n_layer):
        held = f"{len(present)} layers" if whole else f"layers {sorted(present)[:8]}"
        raise CheckpointError(f"{f.path}: metadata {key}={n_layer:,} but the file holds tensors for {held}")


class Llama(Arch):
    """``llama`` (Llama 1-3 without Llama 3.1's frequency factors, Mistral, SmolLM, TinyLlama, Mixtral)."""

    name = "llama"
    rows = (
        Row("token_embd.weight", "model.embed_tokens.weight", ("V", "C")),
        Row("output_norm.weight", "model.norm.weight", ("C",)),
        Row("output.weight", "lm_head.weight", ("V", "C")),
        Row("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", ("C",)),
        Row("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", ("Q", "C")),
        Row("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", ("K", "C")),
        Row("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", ("K", "C")),
        Row("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", ("C", "Q")),
        Row("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", ("C",)),
        Row("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", ("I", "C")),
        Row("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", ("I", "C")),
        Row("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", ("C", "I")),
        Row("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.block_sparse_moe.gate.weight", ("E", "C"),
            quantize=False),
        Row("blk.{i}.ffn_gate_exps.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", ("I", "C")),
        Row("blk.{i}.ffn_up_exps.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", ("I", "C")),
        Row("blk.{i}.ffn_down_exps.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", ("C", "I")),
    )
    refused = {"rope_freqs": "Llama 3.1's RoPE frequency factors (rope type llama3) are not implemented by lmzoo"}
    DENSE = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")

    def hf_config(self, f: GGUFFile) -> dict[str, Any]:
        a = self.name
        n_layer = meta_value(f, f"{a}.block_count", "int")
        check_layers(f, n_layer, f"{a}.block_count")
        n_embd = meta_value(f, f"{a}.embedding_length", "int")
        n_head = meta_value(f, f"{a}.attention.head_count", "int")
        n_kv = meta_value(f, f"{a}.attention.head_count_kv", "int", n_head)
        head_dim = meta_value(f, f"{a}.attention.key_length", "int", max(1, n_embd // n_head))
        if meta_value(f, f"{a}.attention.value_length", "int", head_dim) != head_dim:
            raise CheckpointError(f"{f.path}: {a}.attention.value_length differs from key_length (not supported)")
        rot = meta_value(f, f"{a}.rope.dimension_count", "int", head_dim)
        if rot != head_dim:
            raise CheckpointError(f"{f.path}: {a}.rope.dimension_count={rot} rotates part of a head of {head_dim} "
                                  "(partial RoPE is not supported by lmzoo's Llama)")
        experts = meta_value(f, f"{a}.expert_count", "count", 0)
        hf: dict[str, Any] = {
            "model_type": "mixtral" if experts else "llama",
            "vocab_size": meta_vocab(f, a),
            "max_position_embeddings": meta_context(f, a),
            "hidden_size": n_embd,
            "intermediate_size": meta_value(f, f"{a}.feed_forward_length", "int"),
            "num_hidden_layers": n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": meta_value(f, f"{a}.attention.layer_norm_rms_epsilon", "float"),
            "rope_theta": meta_value(f, f"{a}.rope.freq_base", "float", 10000.0),
            "tie_word_embeddings": "output.weight" not in f.tensors,
            "hidden_act": "silu",
        }
        if experts:
            hf.update(num_local_experts=experts, sliding_window=None,
                      num_experts_per_tok=meta_value(f, f"{a}.expert_used_count", "int"))
        scaling = meta_value(f, f"{a}.rope.scaling.type", "str", "none")
        factor = f.get(f"{a}.rope.scale_linear")  # the older spelling of a linear factor
        if scaling == "linear" or (scaling == "none" and factor is not None):
            key = f"{a}.rope.scaling.factor" if factor is None else f"{a}.rope.scale_linear"
            hf["rope_scaling"] = {"rope_type": "linear", "factor": meta_value(f, key, "float")}
        elif scaling != "none":
            raise CheckpointError(f"{f.path}: {a}.rope.scaling.type={scaling!r} is not read (lmzoo reads none, linear)")
        return hf

    def dims(self, hf: Mapping[str, Any]) -> dict[str, int]:
        hd = hf["head_dim"]
        return {"V": hf["vocab_size"], "C": hf["hidden_size"], "Q": hf["num_attention_heads"] * hd,
                "K": hf["num_key_value_heads"] * hd, "I": hf["intermediate_size"], "E": hf.get("num_local_experts", 0)}

    def required(self, hf: Mapping[str, Any]) -> list[str]:
        names = ["token_embd.weight", "output_norm.weight"] + ([] if hf["tie_word_embeddings"] else ["output.weight"])
        mlp = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if hf.get("num_local_experts") \
            else ("ffn_gate", "ffn_up", "ffn_down")
        return names + [f"blk.{i}.{p}.weight" for i in range(hf["num_hidden_layers"]) for p in (*self.DENSE, *mlp)]

    def _heads(self, r: Row, hf: Mapping[str, Any]) -> int | None:
        """The head count whose rows llama.cpp permuted in this tensor (None: not permuted)."""
        return {"blk.{i}.attn_q.weight": hf["num_attention_heads"],
                "blk.{i}.attn_k.weight": hf["num_key_value_heads"]}.get(r.gguf)

    def unpermute(self, r: Row, t: torch.Tensor, hf: Mapping[str, Any]) -> torch.Tensor:
        heads = self._heads(r, hf)
        return t if heads is None else meta_to_rotate_half(t, heads).contiguous()

    def permute(self, r: Row, t: torch.Tensor, hf: Mapping[str, Any]) -> torch.Tensor:
        heads = self._heads(r, hf)
        return t if heads is None else rotate_half_to_meta(t, heads).contiguous()

    def metadata(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        a = self.name
        problems = []
        if hf.get("sliding_window"):
            problems.append(f"sliding_window={hf['sliding_window']} (llama.cpp's llama attends to the whole context)")
        rope = dict(hf.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "linear"):
            problems.append(f"rope type {rope_type!r} (GGUF export writes default or linear RoPE)")
        if problems:
            raise ConfigError("cannot export as GGUF llama: " + "; ".join(problems))
        out: dict[str, Any] = {
            f"{a}.vocab_size": hf["vocab_size"],
            f"{a}.context_length": hf["max_position_embeddings"],
            f"{a}.embedding_length": hf["hidden_size"],
            f"{a}.block_count": hf["num_hidden_layers"],
            f"{a}.feed_forward_length": hf["intermediate_size"],
            f"{a}.attention.head_count": hf["num_attention_heads"],
            f"{a}.attention.head_count_kv": hf["num_key_value_heads"],
            f"{a}.attention.layer_norm_rms_epsilon": float(hf["rms_norm_eps"]),
            f"{a}.rope.freq_base": float(rope.get("rope_theta", 10000.0)),
            f"{a}.rope.dimension_count": hf["head_dim"],
        }
        if hf["head_dim"] * hf["num_attention_heads"] != hf["hidden_size"]:
            out[f"{a}.attention.key_length"] = out[f"{a}.attention.value_length"] = hf["head_dim"]
        if rope_type == "linear":
            out[f"{a}.rope.scaling.type"] = "linear"
            out[f"{a}.rope.scaling.factor"] = float(rope["factor"])
        if hf.get("num_local_experts"):
            out[f"{a}.expert_count"] = hf["num_local_experts"]
            out[f"{a}.expert_used_count"] = hf["num_experts_per_tok"]
        return out


class GPT2(Arch):
    """``gpt2``: learned positions, LayerNorm with biases, a fused QKV projection, GELU (tanh)."""

    name = "gpt2"
    rows = (
        Row("token_embd.weight", "transformer.wte.weight", ("V", "C")),
        Row("position_embd.weight", "transformer.wpe.weight", ("P", "C"), quantize=False),
        Row("output_norm.weight", "transformer.ln_f.weight", ("C",)),
        Row("output_norm.bias", "transformer.ln_f.bias", ("C",)),
        Row("output.weight", "lm_head.weight", ("V", "C")),
        Row("blk.{i}.attn_norm.weight", "transformer.h.{i}.ln_1.weight", ("C",)),
        Row("blk.{i}.attn_norm.bias", "transformer.h.{i}.ln_1.bias", ("C",)),
        Row("blk.{i}.attn_qkv.weight", "transformer.h.{i}.attn.c_attn.weight", ("3C", "C"), transpose=True),
        Row("blk.{i}.attn_qkv.bias", "transformer.h.{i}.attn.c_attn.bias", ("3C",)),
        Row("blk.{i}.attn_output.weight", "transformer.h.{i}.attn.c_proj.weight", ("C", "C"), transpose=True),
        Row("blk.{i}.attn_output.bias", "transformer.h.{i}.attn.c_proj.bias", ("C",)),
        Row("blk.{i}.ffn_norm.weight", "transformer.h.{i}.ln_2.weight", ("C",)),
        Row("blk.{i}.ffn_norm.bias", "transformer.h.{i}.ln_2.bias", ("C",)),
        Row("blk.{i}.ffn_up.weight", "transformer.h.{i}.mlp.c_fc.weight", ("I", "C"), transpose=True),
        Row("blk.{i}.ffn_up.bias", "transformer.h.{i}.mlp.c_fc.bias", ("I",)),
        Row("blk.{i}.ffn_down.weight", "transformer.h.{i}.mlp.c_proj.weight", ("C", "I"), transpose=True),
        Row("blk.{i}.ffn_down.bias", "transformer.h.{i}.mlp.c_proj.bias", ("C",)),
    )
    PER_LAYER = tuple(r.gguf for r in rows if "{i}" in r.gguf)

    def hf_config(self, f: GGUFFile) -> dict[str, Any]:
        a = self.name
        n_layer = meta_value(f, f"{a}.block_count", "int")
        check_layers(f, n_layer, f"{a}.block_count")
        return {
            "model_type": "gpt2",
            "vocab_size": meta_vocab(f, a),
            "n_positions": meta_context(f, a),
            "n_embd": meta_value(f, f"{a}.embedding_length", "int"),
            "n_inner": meta_value(f, f"{a}.feed_forward_length", "int"),
            "n_layer": n_layer,
            "n_head": meta_value(f, f"{a}.attention.head_count", "int"),
            "layer_norm_epsilon": meta_value(f, f"{a}.attention.layer_norm_epsilon", "float"),
            "activation_function": "gelu_new",  # ggml_gelu: the tanh approximation
            "tie_word_embeddings": "output.weight" not in f.tensors,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }

    def dims(self, hf: Mapping[str, Any]) -> dict[str, int]:
        C = hf["n_embd"]
        return {"V": hf["vocab_size"], "C": C, "3C": 3 * C, "I": hf.get("n_inner") or 4 * C, "P": hf["n_positions"]}

    def required(self, hf: Mapping[str, Any]) -> list[str]:
        names = ["token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"]
        names += [] if hf["tie_word_embeddings"] else ["output.weight"]
        return names + [p.format(i=i) for i in range(hf["n_layer"]) for p in self.PER_LAYER]

    def metadata(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        a = self.name
        if hf.get("activation_function") != "gelu_new":
            raise ConfigError(f"cannot export as GGUF gpt2: activation_function={hf.get('activation_function')!r} "
                              "(llama.cpp's GPT-2 computes GELU's tanh approximation: mlp='gelu_tanh')")
        return {
            f"{a}.vocab_size": hf["vocab_size"],
            f"{a}.context_length": hf["n_positions"],
            f"{a}.embedding_length": hf["n_embd"],
            f"{a}.feed_forward_length": hf.get("n_inner") or 4 * hf["n_embd"],
            f"{a}.block_count": hf["n_layer"],
            f"{a}.attention.head_count": hf["n_head"],
            f"{a}.attention.layer_norm_epsilon": float(hf["layer_norm_epsilon"]),
        }


ARCHS: dict[str, Arch] = {a.name: a for a in (Llama(), GPT2())}
# lmzoo family -> the GGUF architecture it is written as
FAMILY_ARCH = {"llama": "llama", "gpt2": "gpt2"}


def arch_of(f: GGUFFile) -> Arch:
    """The :class:`Arch` of a file, or a CheckpointError naming its architecture and the supported ones."""
    name = f.architecture
    if name not in ARCHS:
        raise CheckpointError(f"{f.path}: GGUF architecture {name!r} is not supported "
                              f"(lmzoo reads: {', '.join(sorted(ARCHS))})")
    return ARCHS[name]
