"""What the Hugging Face decoder checkpoints of the Llama lineage share (Llama, Mistral, Mixtral, Jamba).

They keep their layers under ``model.layers.{i}``, split attention into ``self_attn.{q,k,v,o}_proj``
(lmzoo fuses q, k and v into one ``mixer.qkv``), store mixture-of-experts weights per expert in files
but fused in transformers 5's memory (``experts.gate_up_proj`` (E, 2I, C), ``experts.down_proj``
(E, C, I)), and the untied head as ``lm_head.weight`` outside the prefix. :class:`DecoderLayout`
holds one family's name table (HF template, lmzoo template: ``{i}`` a layer, ``{e}`` an expert,
``{p}`` a parameter the family lists) and streams tensors both ways; the family converters keep
only their config maps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.tensors import check_shape, split_fused_experts

PREFIX = "model."
LM_HEAD = "lm_head.weight"  # HF: outside the prefix
HEAD = "head.weight"  # lmzoo's name for it
QKV = re.compile(r"^layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")
NO_TOKEN_IDS = {  # config.json keys every export sets alike: token ids belong to the tokenizer
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
}


def fill(template: str, m: re.Match[str]) -> str:
    for key, value in m.groupdict().items():
        template = template.replace("{" + key + "}", value)
    return template


class DecoderLayout:
    """One family's HF <-> lmzoo names and the streams that convert its tensors.

    ``key_map``: (HF name without ``model.``, lmzoo name) templates, the first HF name of an lmzoo name
    being the one exported; ``fused_experts``: the regex of transformers 5's fused expert tensors
    (groups: layer, ``gate_up_proj`` or ``down_proj``); ``params``: what ``{p}`` may stand for;
    ``ignored``: HF buffers dropped on the way in; ``what``: the family's name in messages.
    """

    def __init__(self, key_map: Sequence[tuple[str, str]], fused_experts: re.Pattern[str], what: str,
                 params: Sequence[str] = (), ignored: re.Pattern[str] | None = None):
        self.fused_experts, self.ignored, self.what = fused_experts, ignored, what
        alternatives = "|".join(re.escape(p) for p in params)

        def compile_(template: str) -> re.Pattern[str]:
            p = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
            return re.compile("^" + p.replace(r"\{p\}", f"(?P<p>{alternatives})") + "$")

        self.from_hf = [(compile_(hf), lm) for hf, lm in key_map]
        self.to_hf: dict[str, tuple[re.Pattern[str], str]] = {}
        for hf, lm in key_map:
            self.to_hf.setdefault(lm, (compile_(lm), hf))  # the first HF name wins

    def hf_name(self, name: str) -> str:
        """The HF name (without ``model.``) an lmzoo tensor is exported under (per-expert layout)."""
        for pattern, hf in self.to_hf.values():
            if m := pattern.match(name):
                return fill(hf, m)
        raise ConfigError(f"lmzoo tensor {name!r} has no {self.what} counterpart")

    def lmzoo_name(self, name: str) -> str | None:
        return next((fill(lm, m) for pattern, lm in self.from_hf if (m := pattern.match(name))), None)

    def state_from_hf(
        self, tensors: Iterable[tuple[str, torch.Tensor]], expected: Mapping[str, tuple[int, ...]],
        qkv_rows: Mapping[str, int], n_embd: int, n_experts: int, expert_hidden: int, describe: str,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream of HF ``(name, tensor)`` -> lmzoo ``(name, tensor)``; shape errors name the HF tensor.

        A layer's q, k and v are held until all three have arrived (they are neighbours in the files),
        then fused into ``qkv``; a fused expert tensor is split into per-expert copies. ``qkv_rows``:
        the rows of q, k and v; ``describe``: the model's settings, for an unexpected tensor's message.
        """
        pending: dict[str, dict[str, torch.Tensor]] = {}  # lmzoo qkv name -> the pieces seen so far
        for hf_name, t in tensors:
            name = hf_name if hf_name == LM_HEAD else hf_name.removeprefix(PREFIX)
            if self.ignored is not None and self.ignored.match(name):
                continue
            if m := QKV.match(name):
                target = f"blocks.{m.group(1)}.mixer.qkv.weight"
                if target not in expected:
                    raise CheckpointError(f"unexpected tensor {hf_name!r}: the model ({describe}) has no "
                                          f"attention in layer {m.group(1)}")
                check_shape(hf_name, t, (qkv_rows[m.group(2)], n_embd))
                parts = pending.setdefault(target, {})
                parts[m.group(2)] = t
                if len(parts) == 3:
                    yield target, torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
                    del pending[target]
                continue
            if m := self.fused_experts.match(name):
                layer = m.group(1)
                if f"blocks.{layer}.ffn.router.weight" not in expected:
                    raise CheckpointError(f"unexpected tensor {hf_name!r}: the model has no experts in layer {layer}")
                yield from split_fused_experts(hf_name, m.group(2), t, f"blocks.{layer}.ffn.experts", n_experts,
                                               expert_hidden, n_embd)
                continue
            lm = HEAD if name == LM_HEAD else self.lmzoo_name(name)
            if lm is None:
                raise CheckpointError(f"unexpected tensor {hf_name!r} (not in a {self.what} model)")
            if lm not in expected:
                raise CheckpointError(f"unexpected tensor {hf_name!r}: the model ({describe}) has no {lm!r}")
            check_shape(hf_name, t, expected[lm])
            yield lm, t
        if pending:
            missing = [f"model.layers.{n.split('.')[1]}.self_attn.{p}_proj.weight"
                       for n, parts in pending.items() for p in "qkv" if p not in parts]
            raise CheckpointError(f"missing tensor(s) {', '.join(missing[:5])}")

    def state_to_hf(self, state: Mapping[str, torch.Tensor], qkv_rows: Mapping[str, int],
                    tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` pairs of an lmzoo state dict: qkv split into q, k, v (``qkv_rows``),
        experts apart, a tied head once (transformers re-ties it)."""
        for name, t in state.items():
            if name == HEAD:
                if not tied:
                    yield LM_HEAD, t.contiguous()
                continue
            if m := re.match(r"^blocks\.(\d+)\.mixer\.qkv\.weight$", name):
                pieces = t.split([qkv_rows[part] for part in "qkv"], dim=0)
                for p, piece in zip("qkv", pieces):  # clone: safetensors refuses views
                    yield f"{PREFIX}layers.{m.group(1)}.self_attn.{p}_proj.weight", piece.clone()
                continue
            yield PREFIX + self.hf_name(name), t.contiguous()


def qkv_rows(n_head: int, n_kv_head: int, head_dim: int) -> dict[str, int]:
    """Rows of q, k and v in the fused ``mixer.qkv`` weight (grouped-query: k and v have ``n_kv_head`` heads)."""
    return {"q": n_head * head_dim, "k": n_kv_head * head_dim, "v": n_kv_head * head_dim}
