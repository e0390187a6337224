"""LoRA: low-rank adaptation of frozen weights (Hu et al. 2021, arXiv:2106.09685).

A frozen ``nn.Linear`` computes ``y = x W^T + b`` with ``W`` of shape (out, in). LoRA learns a
low-rank update instead of ``W`` itself:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in),  B: (out, r),  r << min(in, out)

``A`` starts random (Kaiming-uniform, as in the paper's code and ``peft``) and ``B`` at zero, so the
adapted model *is* the base model at step 0 and training moves away from it smoothly. Only A and B
train: for a (C, C) matrix that is ``2 r C`` numbers instead of ``C^2``. ``alpha / r`` keeps the
update's scale independent of the rank, so changing r needs no new learning rate.

How it is applied: :func:`apply_lora` rewrites the model *from outside*: every ``nn.Linear`` (or
:class:`lmzoo.quant.nf4.NF4Linear`) whose module name matches a regular expression is replaced by a
:class:`LoRALinear` that holds the original as ``.base``. No model class is subclassed, so any family
(GPT-2, Llama, Mamba...) takes adapters by name: ``"mixer"`` (every block's sequence mixer, the
default), ``"mixer.qkv|ffn"``: the part names are the same in every family.

``merge`` folds ``(alpha/r) B A`` into ``W`` (zero extra cost at inference); ``unmerge`` subtracts it
again. Adapters are saved on their own (:func:`save_adapter`: a few KB of safetensors + JSON), and
exported in Hugging Face ``peft``'s format (:func:`export_peft`) so ``PeftModel.from_pretrained`` loads
them onto the ``transformers`` model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmzoo.config import read_json
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.atomic import atomic_path
from lmzoo.quant import check_module_list

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclasses.dataclass
class LoRAConfig:
    """What :func:`apply_lora` injects: ``target`` is a regex searched in module names. The default,
    ``mixer``, adapts every linear layer of every block's sequence mixer, whatever the family (the
    attention's ``qkv`` and ``proj``; a Mamba layer's projections): the part names are the same in
    every family (:mod:`lmzoo.models.base`). ``ffn`` adds the feed-forward layers; ``mixer|ffn`` both."""

    target: str = "mixer"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def validate(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.target)
        except re.error as e:
            raise ConfigError(f"LoRA target {self.target!r} is not a valid regular expression: {e}") from None


class LoRALinear(nn.Module):
    """A frozen linear layer ``base`` plus the trainable low-rank update ``(alpha/r) B A``.

    ``base`` is an ``nn.Linear`` or anything with ``in_features``, ``out_features`` and a forward
    ``(..., in) -> (..., out)`` (e.g. the NF4-quantized :class:`NF4Linear` of QLoRA).
    Input ``(..., in)``, output ``(..., out)``.
    """

    rewrite = "lora"  # what stands in a Linear's place (formats.hf.check_exportable reads it)

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        w = getattr(base, "lora_dtype_hint", None) or next(base.parameters(), torch.empty(0)).dtype
        dtype = w if w.is_floating_point else torch.float32
        device = next(iter(list(base.parameters()) + list(base.buffers()))).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        # peft's init: A like nn.Linear's default (Kaiming uniform, a = sqrt(5)); B = 0 -> delta W = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # Code that reads ``layer.weight`` / ``layer.bias`` (e.g. weight tying, init) still finds the base's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha/r) B A``, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # two thin matmuls (x A^T) B^T: O(r (in + out)) per token, never the (out, in) product
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight`` (inference at the base model's cost)."""
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise ConfigError(
                f"cannot merge LoRA into a {type(self.base).__name__} base (a quantized weight would have "
                "to be re-quantized); dequantize the base first (lmzoo.peft.qlora.dequantize_model)"
            )
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to float rounding: <= 1e-6 in float32)."""
        if not self.merged:
            return
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _adaptable(m: nn.Module) -> bool:
    from lmzoo.quant.nf4 import NF4Linear

    return isinstance(m, (nn.Linear, NF4Linear)) and not isinstance(m, LoRALinear)


def linear_names(model: nn.Module) -> list[str]:
    """Names of the modules LoRA can wrap (``nn.Linear`` and NF4-quantized linears)."""
    return [n for n, m in model.named_modules() if _adaptable(m) and not n.endswith(".base")]


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(module name, LoRALinear)`` pairs of a model, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def matching_names(model: nn.Module, target: str) -> list[str]:
    """The adaptable module names in which ``target`` (a regex) is found; ConfigError when none,
    naming the available ones."""
    names = linear_names(model)
    pattern = re.compile(target)
    hits = [n for n in names if pattern.search(n)]
    if not hits:
        shown = sorted({re.sub(r"\.\d+\.", ".{i}.", n) for n in names})
        raise ConfigError(
            f"LoRA target {target!r} matches no Linear module; available: {', '.join(shown)}"
        )
    return hits


def trainable_params(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (tied ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, **kwargs: Any) -> dict[str, Any]:
    """Freeze ``model`` and wrap every matching linear layer in a :class:`LoRALinear`, in place.

    ``cfg`` or keyword fields of :class:`LoRAConfig` (``target``, ``r``, ``alpha``, ``dropout``).
    Returns a report ``{"modules": [...], "trainable": n, "total": n, "fraction": f}``; the config
    is kept on ``model.lora`` (saved with the adapter). Raises ConfigError when nothing matches.
    """
    cfg = cfg or LoRAConfig(**kwargs)
    cfg.validate()
    if getattr(model, "lora", None):
        raise ConfigError("the model already has LoRA adapters (merge_lora(unwrap=True) removes them)")
    names = matching_names(model, cfg.target)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout))
    model.lora = {**dataclasses.asdict(cfg), "modules": names}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    total += sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "NF4Linear")  # buffers
    n = trainable_params(model)
    return {"modules": names, "trainable": n, "total": total, "fraction": n / total}


def merge_lora(model: nn.Module, unwrap: bool = False) -> nn.Module:
    """Merge every adapter into its base weight. ``unwrap`` also puts the plain ``nn.Linear`` back
    (the model is then an ordinary model again, e.g. for :func:`lmzoo.to_hf`)."""
    for name, m in list(lora_modules(model)):
        m.merge()
        if unwrap:
            _set_module(model, name, m.base)
    if unwrap:
        model.lora = None
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (without ``unwrap``)."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model


def export_merged_hf(model: nn.Module, path: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write the merged model as a Hugging Face checkpoint (the original ``model`` is untouched)."""
    from lmzoo.formats.hf import to_hf

    merged = merge_lora(copy.deepcopy(model), unwrap=True)
    return to_hf(merged, path, dtype=dtype)


# --- saving and loading adapters on their own -------------------------------------------------------------

def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}`` of every adapter."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A"] = m.lora_A.detach().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().contiguous()
    return out


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` (LoRA config, target modules, base family
    and config) atomically into ``directory``; the base weights are not written."""
    if not getattr(model, "lora", None):
        raise ConfigError("the model has no LoRA adapters to save")
    directory = Path(directory)
    meta = {"lora": model.lora, "family": getattr(model, "family", None)}
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        meta["base_config"] = dataclasses.asdict(cfg)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file(adapter_state(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "lmzoo": "lora"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return directory


def check_spec(spec: Any) -> dict[str, Any]:
    """A saved LoRA config (``model.lora`` as written to ``adapter.json`` or a checkpoint's config),
    checked field by field: ConfigError naming the first bad one. Returns it (``target`` defaulted)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"expected a mapping of LoRA settings, got {spec!r}")
    r, alpha, dropout = spec.get("r"), spec.get("alpha"), spec.get("dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"r={r!r}: expected a positive integer")
    for key, v in (("alpha", alpha), ("dropout", dropout)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{key}={v!r}: expected a number")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout!r}: expected a number in [0, 1)")
    modules = check_module_list(spec.get("modules"))
    target = spec.get("target", "|".join(modules))
    if not isinstance(target, str):
        raise ConfigError(f"target={target!r}: expected a string")
    merged = spec.get("merged", [])
    if not isinstance(merged, list) or any(n not in modules for n in merged):
        raise ConfigError(f"merged={merged!r}: expected a list of adapted module names")
    return {**spec, "target": target, "dropout": float(dropout), "merged": merged}


def _module_shapes(model: nn.Module, modules: list[str]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of the adaptable layers ``modules`` names; CheckpointError for one the model
    lacks (an adapter or checkpoint made for another base)."""
    own = dict(lora_modules(model))
    available = set(linear_names(model)) | set(own)
    shapes = {}
    for n in modules:
        if n not in available:
            raise CheckpointError(f"adapter module {n!r} does not exist in this model: another base model?")
        m = own.get(n) or model.get_submodule(n)
        shapes[n] = (m.out_features, m.in_features)
    return shapes


def _inject(model: nn.Module, spec: dict[str, Any]) -> None:
    """Wrap exactly the layers ``spec["modules"]`` names (as :func:`apply_lora` with ``spec``'s r,
    alpha and dropout), keep its ``target`` and mark the ``merged`` ones (their base weight holds the
    update already)."""
    exact = "^(" + "|".join(re.escape(n) for n in spec["modules"]) + ")$"
    apply_lora(model, LoRAConfig(exact, spec["r"], float(spec["alpha"]), spec["dropout"]))
    model.lora["target"] = spec["target"]
    own = dict(lora_modules(model))
    for n in spec.get("merged", []):
        own[n].merged = True


def apply_spec(model: nn.Module, spec: Any) -> nn.Module:
    """Rebuild the LoRA wrappers a checkpoint's config records (``lmzoo.lora``, written by
    :func:`lmzoo.save` from ``model.lora``) on a freshly built model, before its weights load.
    ConfigError / CheckpointError naming what is malformed or missing from the model."""
    spec = check_spec(spec)
    if getattr(model, "lora", None):
        raise ConfigError("the model already has LoRA adapters")
    _module_shapes(model, spec["modules"])
    _inject(model, spec)
    return model


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(checked LoRA config, tensors) of an adapter directory; CheckpointError for any defect."""
    cfg_file, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory} holds no LoRA adapter ({ADAPTER_CONFIG} missing)")
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {ADAPTER_WEIGHTS} is missing")
    meta = read_json(cfg_file, CheckpointError)
    if "lora" not in meta:
        raise CheckpointError(f"{cfg_file}: expected a JSON object with a 'lora' entry")
    try:
        spec = check_spec(meta["lora"])
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: lora: {e}") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # SafetensorError, OSError...: a truncated or foreign file
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({msg})") from None
    return spec, state


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject (if needed) and load a saved adapter into ``model``.

    Everything is checked before the model is touched, each defect a one-line CheckpointError: a
    missing or malformed ``adapter.json`` / ``adapter.safetensors``; an adapter made for another base
    (a module it names is missing, or a tensor's shape differs: named, with both shapes); a missing,
    unexpected or non-floating tensor. Every adapted module needs both ``lora_A`` (r, in) and
    ``lora_B`` (out, r).
    """
    directory = Path(directory)
    spec, state = _read_adapter(directory)
    shapes = _module_shapes(model, spec["modules"])
    r = spec["r"]
    expected = {}
    for n, (out_f, in_f) in shapes.items():
        expected[f"{n}.lora_A"], expected[f"{n}.lora_B"] = (r, in_f), (out_f, r)
    where = directory / ADAPTER_WEIGHTS
    for key, t in state.items():
        if key not in expected:
            raise CheckpointError(f"{where}: adapter tensor {key!r} has no LoRA module in this model")
        if tuple(t.shape) != expected[key]:
            raise CheckpointError(
                f"{where}: adapter tensor {key!r} has shape {tuple(t.shape)} but this model's is {expected[key]}: "
                "the adapter was made for another base model"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: adapter tensor {key!r} has dtype {t.dtype}, expected floating point")
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: missing adapter tensor(s) {', '.join(missing[:3])}{more}")
    own = dict(lora_modules(model))
    if own:  # continuing: the model's adapters must be the saved ones
        if set(own) != set(spec["modules"]) or any(m.r != r or m.alpha != spec["alpha"] for m in own.values()):
            raise CheckpointError(
                f"{directory}: the adapter's modules, rank (r={r}) or alpha ({spec['alpha']}) differ from the "
                "model's LoRA layers"
            )
        if any(m.merged for m in own.values()):
            raise ConfigError("unmerge the model's adapters before loading an adapter into them")
    else:
        _inject(model, {**spec, "merged": []})
        own = dict(lora_modules(model))
    with torch.no_grad():
        for key, t in state.items():
            module, _, which = key.rpartition(".")
            getattr(own[module], which).copy_(t)
    return model


# --- export in Hugging Face peft's format --------------------------------------------------------------------

def _hf_pieces(conv: Any, cfg: Any, name: str, out_f: int, in_f: int) -> list[tuple[str, torch.Tensor, bool]]:
    """Where the rows of lmzoo weight ``name`` (out, in) go in HF: ``[(HF module, row indices, transposed)]``.

    Asks the family's own converter: a probe weight whose entry (o, i) is ``o * in + i`` goes through
    ``state_to_hf`` and the values that come out say which rows each HF tensor holds and whether it was
    transposed (GPT-2's Conv1D). So fused q|k|v splits into Llama's q/k/v_proj with no per-family code.
    """
    probe = torch.arange(out_f * in_f, dtype=torch.float64).view(out_f, in_f)
    pieces = []
    for hf_name, t in conv.state_to_hf({f"{name}.weight": probe}, cfg):
        t = t.to(torch.float64)
        transposed = t.shape[0] == in_f and (t.shape[1] != in_f or bool((t[1:, 0] - t[:-1, 0] == 1).all()))
        rows = (t[0, :] if transposed else t[:, 0]) // in_f
        pieces.append((hf_name.removesuffix(".weight"), rows.long(), transposed))
    return pieces


# Adapted layers that peft cannot put on the transformers model so that it computes what lmzoo does, by
# family: (regex searched in the lmzoo module name, why). Refused by export_peft instead of written wrong.
_DT_PROJ = ("transformers reads dt_proj.weight directly in its scan, so peft's adapter on it would be ignored "
            "(wrong logits); merge it instead (export_merged_hf)")
PEFT_REFUSED: dict[str, tuple[tuple[str, str], ...]] = {
    "mamba": (
        (r"\.dt_proj$", _DT_PROJ),
        (r"\.out_proj$", "peft refuses LoRA on a Mamba model's out_proj"),
    ),
    "llama": (
        (r"\.router$", "transformers' Mixtral router is not a Linear layer (peft cannot load it); merge it instead "
                       "(export_merged_hf)"),
    ),
    "jamba": (
        (r"\.dt_proj$", _DT_PROJ),
        (r"\.router$", "transformers' Jamba router is not a Linear layer (peft refuses it)"),
        (r"\.experts\.\d+\.", "transformers' Jamba holds its experts fused, with no per-expert Linear layer "
                              "for peft (the adapter would be dropped: wrong logits)"),
    ),
}


# transformers 5 holds Mixtral's experts fused, as parameters (``mlp.experts.gate_up_proj`` (E, 2I, C) and
# ``mlp.experts.down_proj`` (E, C, I)), with no per-expert Linear. peft converts an adapter written in the
# per-expert layout (target modules named ``w1``/``w3``/``w2``) into adapters on those parameters
# (peft.utils.transformers_weight_conversion): w1 and w3 concatenated (rank and alpha doubled, B block-
# diagonal), every expert of a layer stacked. It applies what lmzoo computes only when a layer adapts every
# one of its experts, and either ``down`` alone or all three; gate and up without down load without error but
# without effect (peft nests the gate_up wrapper inside the down one and finds no key for it).
_MIXTRAL_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)$")
_EXPERT_SETS = ({"w2"}, {"w1", "w2", "w3"})  # per layer: the projections peft applies exactly


def _peft_expert_targets(targets: list[str], n_experts: int, lmzoo_name: dict[str, str]) -> list[str]:
    """``target_modules`` for peft: Mixtral's per-expert modules by their short names (``w1``, ``w2``,
    ``w3``: what peft converts onto the fused experts), everything else by full name. ConfigError for expert
    adapters peft would reject or load without applying (see above), naming the lmzoo module."""
    layers: dict[str, dict[str, set[int]]] = {}
    plain = []
    for t in targets:
        m = _MIXTRAL_EXPERT.match(t)
        if m:
            layers.setdefault(m.group(1), {}).setdefault(m.group(3), set()).add(int(m.group(2)))
        else:
            plain.append(t)
    hf_kind = {"w1": "gate", "w3": "up", "w2": "down"}  # HF's per-expert names -> what they compute
    for layer, kinds in layers.items():
        name = lmzoo_name[next(t for t in targets if f".layers.{layer}.block_sparse_moe.experts." in t)]
        partial = sorted(hf_kind[k] for k, experts in kinds.items() if len(experts) != n_experts)
        if partial:
            raise ConfigError(f"cannot export the adapters on {name!r} and its layer's experts in peft format: "
                              f"{'/'.join(partial)} adapted on some of the {n_experts} experts, and transformers "
                              "holds the experts fused (peft adapts all of a layer's experts or none)")
        if set(kinds) not in _EXPERT_SETS:
            got = "+".join(sorted(hf_kind[k] for k in kinds))
            raise ConfigError(f"cannot export the adapters on {name!r} and its layer's experts in peft format: "
                              f"peft applies expert adapters on down alone or on gate+up+down, not on {got} "
                              "(transformers fuses gate and up; peft would reject it or drop it silently)")
    return plain + sorted({k for kinds in layers.values() for k in kinds})


def export_peft(model: nn.Module, path: str | Path) -> Path:
    """Write the unmerged adapters in Hugging Face ``peft``'s LoRA format, loadable with
    ``PeftModel.from_pretrained(hf_model, path)`` onto the model :func:`lmzoo.to_hf` writes.

    ``adapter_model.safetensors`` holds ``base_model.model.<HF module>.lora_A.weight`` (r, in) and
    ``.lora_B.weight`` (out, r). A fused lmzoo projection that HF keeps apart (Llama's ``attn.qkv`` ->
    ``q_proj``, ``k_proj``, ``v_proj``) is exported *exactly*: the rows of ``B`` split per projection and
    each gets the same ``A``, since ``B A`` restricted to the q rows is ``B_q A``. (The reverse, three
    separate q/k/v adapters into one fused rank-r adapter, is not possible in general.)
    GPT-2's ``Conv1D`` stores (in, out): ``fan_in_fan_out`` is set, which peft needs for merging; A and
    B themselves keep their (r, in) / (out, r) shapes in peft's Conv1D LoRA too.

    Mixtral's experts are written in the per-expert layout (``block_sparse_moe.experts.{e}.w1/w2/w3``),
    targeted by their short names, which peft converts onto transformers' fused expert parameters.

    Refused with a one-line ConfigError: a base :func:`lmzoo.to_hf` cannot write (multi-token heads,
    BitNet layers, a config HF lacks), and adapters peft would apply wrongly or not at all on the HF
    model (:data:`PEFT_REFUSED`: Mamba/Jamba ``dt_proj``, Mamba ``out_proj``, Jamba's router and experts;
    Mixtral's router, and expert adapters other than ``down`` or ``gate+up+down`` on all of a layer's
    experts: :func:`_peft_expert_targets`).
    """
    from lmzoo.formats.hf import _converter_for_family, check_exportable

    if not getattr(model, "lora", None):
        raise ConfigError("the model has no LoRA adapters to export")
    if any(m.merged for _, m in lora_modules(model)):
        raise ConfigError("unmerge the adapters before exporting them in peft format")
    check_exportable(model, allow=("lora", "nf4"))  # the base must be one to_hf can write
    for name, _ in lora_modules(model):
        why = next((w for pattern, w in PEFT_REFUSED.get(model.family, ()) if re.search(pattern, name)), None)
        if why:
            raise ConfigError(f"cannot export the adapter on {name!r} in peft format: {why}")
    conv = _converter_for_family(model.family)
    tensors: dict[str, torch.Tensor] = {}
    targets, lmzoo_name, fan_in_fan_out = [], {}, False
    for name, m in lora_modules(model):
        for hf_module, rows, transposed in _hf_pieces(conv, model.config, name, m.out_features, m.in_features):
            prefix = f"base_model.model.{hf_module}"
            tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().float().cpu().clone().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = m.lora_B.detach().float().cpu()[rows].contiguous()
            targets.append(hf_module)
            lmzoo_name[hf_module] = name
            fan_in_fan_out |= transposed
    targets = _peft_expert_targets(targets, getattr(model.config, "n_experts", 0), lmzoo_name)
    lcfg = model.lora
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lcfg["r"],
        "lora_alpha": lcfg["alpha"],
        "lora_dropout": lcfg["dropout"],
        # full module names, matched exactly (no other layer adapted); Mixtral's experts by short name
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return path
