"""lmzoo's own checkpoints: a directory per checkpoint, written atomically.

    <dir>/config.json         {"family": ..., model config fields}
    <dir>/model.safetensors   the weights (tied weights stored once)
    <dir>/tokenizer/          the tokenizer, when known (lmzoo.tokenizer format)
    <dir>/train_state.pt      optional: optimizer, schedule, RNG, data position, step
                              (plain tensors and numbers, read with torch.load(weights_only=True))

A run directory holds ``ckpt-<step>`` checkpoints, ``best`` and a ``LATEST`` file naming the
newest complete one. Every checkpoint is written under a temporary name and renamed, so a kill
at any moment leaves either the previous state or the new one, never a partial directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmzoo.config import read_bounded, read_json
from lmzoo.errors import CheckpointError, ConfigError, LmzooError, quote
from lmzoo.formats.atomic import atomic_path, atomic_write_text
from lmzoo.formats.tensors import DIGEST_KEY, corrupt_error, tensors_digest
from lmzoo.memguard import check_fits
from lmzoo.models import build_model, config_from_dict, config_to_dict
from lmzoo.models.base import LanguageModel

WEIGHTS, CONFIG, TRAIN_STATE, TOKENIZER = "model.safetensors", "config.json", "train_state.pt", "tokenizer"
LATEST = "LATEST"


def model_state(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The state dict with tied (shared) tensors kept once, contiguous, ready for safetensors."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.device.type != "meta" else id(v)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def write_checkpoint(
    model: LanguageModel,
    directory: str | Path,
    tokenizer=None,
    train_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    shards: Path | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically (a temp dir renamed into place).

    ``weights``: the tensors to write when ``model`` holds only shards of them (FSDP2, tensor or
    pipeline parallel gather them first); ``shards``: a ``torch.distributed.checkpoint`` directory
    written by every rank, moved in as ``dcp/`` (docs/distributed.md).
    """
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        weights = model_state(model) if weights is None else weights
        # a SHA-256 of the tensors in the header: load_weights refuses a file whose bytes changed since
        meta = {"format": "pt", "lmzoo": "1", DIGEST_KEY: tensors_digest(weights)}
        save_file(weights, str(tmp / WEIGHTS), metadata=meta)
        if shards is not None:
            os.replace(shards, tmp / "dcp")
        cfg = config_to_dict(model)
        quant = getattr(model, "quantization", None)  # layers rewritten from outside (lmzoo.quant)
        if quant:
            extra = {**(extra or {}), "quantization": quant}
        n_future = getattr(model, "n_future", None)  # a MultiTokenLM (lmzoo.models.mtp): its extra heads
        if n_future:
            extra = {**(extra or {}), "multi_token": {"n_future": int(n_future)}}
        extra = {**(extra or {}), **_peft_settings(model)}
        if extra:
            cfg["lmzoo"] = extra
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
    return directory


def _peft_settings(model: LanguageModel) -> dict[str, Any]:
    """What lmzoo.peft rewrote in ``model`` (NF4 layers, LoRA wrappers), so that a fine-tuning
    checkpoint loads: :func:`apply_settings` rebuilds the same modules before the weights load."""
    out: dict[str, Any] = {}
    nf4 = getattr(model, "nf4", None)  # QLoRA's NF4-quantized layers (lmzoo.peft.qlora)
    if nf4:
        out["nf4"] = dict(nf4)
    lora = getattr(model, "lora", None)  # LoRA adapters (lmzoo.peft.lora)
    if lora:
        from lmzoo.peft.lora import lora_modules

        merged = [n for n, m in lora_modules(model) if m.merged]  # their base weights hold the update
        out["lora"] = {**lora, **({"merged": merged} if merged else {})}
    return out


def save(model: LanguageModel, directory: str | Path, tokenizer=None) -> Path:
    """Save a model (and its tokenizer) as an lmzoo checkpoint directory."""
    return write_checkpoint(model, directory, tokenizer)


def _stays_inside(directory: Path, entry: Path) -> bool:
    """Whether ``entry`` (symlinks resolved) is a direct child of ``directory``."""
    try:
        return entry.resolve().parent == directory.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return False


def entry_inside(directory: Path, name: str, where: Path) -> Path:
    """``directory / name`` when ``name`` is one entry of ``directory`` that stays inside it, symlinks
    resolved; else a CheckpointError naming ``where`` (the file that named it). A tampered ``LATEST``
    (``../../other/ckpt-...``, an absolute path) must not lead a loader out of its run directory."""
    entry = directory / name
    if Path(name).name != name or name in (".", "..") or "\0" in name or not _stays_inside(directory, entry):
        raise CheckpointError(f"{where} names {quote(name)}, which is not an entry inside {directory}")
    return entry


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or a run directory (newest complete checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory (expected a checkpoint or run directory)")
    if (p / CONFIG).exists() or (p / WEIGHTS).exists():
        return p
    latest = p / LATEST
    if latest.is_file():
        name = read_bounded(latest, 4096, CheckpointError).decode("utf-8", "replace").strip()
        if name and (entry_inside(p, name, latest) / CONFIG).is_file():
            return p / name
    ckpts = sorted(p.glob("ckpt-*"), key=lambda q: q.name)
    ckpts = [c for c in ckpts if (c / CONFIG).is_file() and (c / WEIGHTS).is_file() and _stays_inside(p, c)]
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"{p}: no checkpoint found (expected {CONFIG} and {WEIGHTS}, or ckpt-* directories)")


def read_config(directory: str | Path) -> tuple[str, Any, dict[str, Any]]:
    """(family, Config, raw dict) of a checkpoint directory."""
    d = Path(directory)
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"{d}: missing {CONFIG}")
    try:
        raw = read_json(d / CONFIG)
    except LmzooError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(raw.get("lmzoo") or {}, dict):
        raise CheckpointError(f"{d / CONFIG}: 'lmzoo' must be a mapping of lmzoo settings")
    raw_cfg = {k: v for k, v in raw.items() if k != "lmzoo"}
    try:
        family, cfg = config_from_dict(raw_cfg)
    except LmzooError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None
    return family, cfg, raw


def load_weights(model: LanguageModel, file: str | Path, strict: bool = True) -> None:
    """Load safetensors weights, naming any missing, unexpected or mis-shaped tensor."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing weights file")
    try:
        state = load_file(str(file))
        with safe_open(str(file), framework="pt") as f:
            digest = (f.metadata() or {}).get(DIGEST_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    if digest is not None and tensors_digest(state) != digest:  # a flipped bit would load as a wrong weight
        raise corrupt_error(file)
    expected = model.state_dict()
    tied = set(expected) - set(model_state(model))
    # names an older lmzoo wrote (the parts before their shared names) read as today's
    state = {k if k in expected else model.upgrade_name(k): v for k, v in state.items()}
    for k, v in state.items():
        if k not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {k!r} (not in the {model.family} model)")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{file}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    missing = [k for k in expected if k not in state and k not in tied]
    if strict and missing:
        raise CheckpointError(f"{file}: missing tensor(s) {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False)


def upgrade_settings(model: LanguageModel, settings: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``lmzoo`` settings with the module names and patterns older versions recorded
    (quantized layers, NF4 layers, LoRA targets) as today's model names them."""
    out = dict(settings)
    for key in ("quantization", "nf4", "lora"):
        spec = out.get(key)
        if not isinstance(spec, dict):
            continue  # malformed: the spec's own check names it
        spec = dict(spec)
        for field in ("modules", "merged"):
            if isinstance(spec.get(field), list):
                spec[field] = [model.upgrade_name(n) if isinstance(n, str) else n for n in spec[field]]
        if isinstance(spec.get("target"), str):
            spec["target"] = model.upgrade_name(spec["target"])
        out[key] = spec
    return out


def apply_settings(model: LanguageModel, raw: dict[str, Any], where: str | Path) -> LanguageModel:
    """A freshly built model rebuilt as a checkpoint's ``lmzoo`` settings record (before its weights
    load), in the order they were applied: the extra multi-token heads around it, the quantized
    layers (BitNet), QLoRA's NF4 layers, then the LoRA wrappers (``raw``: its config).

    The settings come from a file: a malformed one is a one-line CheckpointError naming the key."""
    settings = upgrade_settings(model, raw.get("lmzoo") or {})  # what lmzoo.save recorded beyond the config
    mtp = settings.get("multi_token")
    if mtp:  # the extra prediction heads around the model
        n = mtp.get("n_future") if isinstance(mtp, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise CheckpointError(f"{where}: lmzoo.multi_token.n_future must be an integer in [1, 64], got {n!r}")
        from lmzoo.models.mtp import MultiTokenLM

        try:
            model = MultiTokenLM(model, n)
        except ConfigError as e:
            raise CheckpointError(f"{where}: lmzoo.multi_token: {e}") from None
    from lmzoo import quant
    from lmzoo.peft import lora, qlora

    # the quantized layers (lmzoo.quant, e.g. BitNet), QLoRA's NF4 base layers, the LoRA adapters
    for key, apply_spec in (("quantization", quant.apply_spec), ("nf4", qlora.apply_spec), ("lora", lora.apply_spec)):
        spec = settings.get(key)
        if spec is None:
            continue
        try:
            apply_spec(model, spec)
        except LmzooError as e:
            raise CheckpointError(f"{where}: lmzoo.{key}: {e}") from None
    return model


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         check_memory: bool = True) -> LanguageModel:
    """Load an lmzoo checkpoint (or the newest one of a run directory) as an eval-mode model.

    A model whose estimated memory exceeds what is available is refused before it is built
    (lmzoo.memguard; ``check_memory=False`` or LMZOO_NO_MEMORY_CHECK=1 skips the check).
    """
    d = resolve(path)
    family, cfg, raw = read_config(d)
    check_fits(family, cfg, "cpu", where=str(d), check=check_memory)  # built in float32 on the CPU first
    if torch.device(device).type != "cpu":
        check_fits(family, cfg, device, dtype, where=str(d), check=check_memory)
    model = apply_settings(build_model(family, cfg), raw, d / CONFIG)
    load_weights(model, d / WEIGHTS)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


def load_tokenizer_of(path: str | Path):
    """The tokenizer saved with a checkpoint, or None."""
    d = resolve(path)
    if not (d / TOKENIZER).is_dir():
        return None
    from lmzoo.tokenizer import load_tokenizer

    return load_tokenizer(d / TOKENIZER)


def load_train_state(directory: str | Path, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The ``train_state.pt`` of a training checkpoint, read without unpickling objects and checked by
    :func:`check_train_state` (against ``optimizer`` when given)."""
    f = Path(directory) / TRAIN_STATE
    if not f.is_file():
        raise CheckpointError(f"{directory}: missing {TRAIN_STATE} (not a training checkpoint)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: never unpickle arbitrary objects
        raise CheckpointError(f"{f}: unreadable train state ({type(e).__name__}: {str(e)[:200]})") from None
    check_train_state(state, f, optimizer)
    return state


# what every train state a Trainer writes holds (the optimizer's too, unless it is sharded in dcp/)
TRAIN_STATE_KEYS = ("step", "tokens_seen", "best_val", "scaler", "train_loader", "rng")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def check_train_state(st: Any, where: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """CheckpointError naming the entry of a train state (a dict of plain values and tensors, as
    ``Trainer.state_dict`` writes it) that is missing or of the wrong type or shape, so that a tampered
    file is refused in one line before any of it is restored. :data:`TRAIN_STATE_KEYS` are required (and
    ``optimizer`` with ``optimizer``: its saved state must then have its groups and parameter shapes); the
    entries later versions added are checked where present."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{where}: train state entry {key!r} {what}")

    if not isinstance(st, dict):
        raise CheckpointError(f"{where}: expected a mapping of training state, got {type(st).__name__}")
    missing = [k for k in TRAIN_STATE_KEYS + (("optimizer",) if optimizer is not None else ()) if k not in st]
    if missing:
        raise CheckpointError(f"{where}: the train state lacks {', '.join(missing)} (not a file lmzoo wrote)")
    if not _count(st["step"]):
        raise bad("step", f"must be a non-negative integer, got {quote(st['step'])}")
    for key in ("tokens_seen", "es_bad_evals"):
        if key in st and not _count(st[key]):
            raise bad(key, f"must be a non-negative integer, got {quote(st[key])}")
    for key in ("best_val", "es_best", "train_time_s"):
        if key in st and (not isinstance(st[key], (int, float)) or isinstance(st[key], bool)):
            raise bad(key, f"must be a number, got {quote(st[key])}")
    for key in ("optimizer", "scaler", "train_loader", "rng"):
        if key in st and not isinstance(st[key], dict):
            raise bad(key, f"must be a mapping, got {type(st[key]).__name__}")
    if "train_config" in st and not isinstance(st["train_config"], str):
        raise bad("train_config", "must be the run's settings as a JSON string")
    scaler = st.get("scaler") or {}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scaler.values()):
        raise bad("scaler", "must hold the gradient scaler's numbers")
    loader = st.get("train_loader")
    if loader is not None and (not _count(loader.get("step")) or not all(
            _count(loader[k]) for k in ("seed", "world_size", "block_size", "batch_size") if k in loader)):
        raise bad("train_loader", "must hold a non-negative integer step (and integer seed, sizes)")
    rng = st.get("rng")
    if rng is not None:
        t, np_state, py = rng.get("torch"), rng.get("numpy"), rng.get("python")
        torch_ok = isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == torch.get_rng_state().shape
        numpy_ok = (isinstance(np_state, torch.Tensor) and tuple(np_state.shape) == (624,)
                    and not np_state.is_floating_point() and _count(rng.get("numpy_pos")) and rng["numpy_pos"] <= 624)
        python_ok = (isinstance(py, (list, tuple)) and len(py) == 625 and all(_count(v) and v < 2**32 for v in py)
                     and (rng.get("python_pos") is None or isinstance(rng.get("python_pos"), float)))
        if not (torch_ok and numpy_ok and python_ok):
            raise bad("rng", "is not the torch, Python and NumPy generator states lmzoo saves")
        cuda = rng.get("cuda", [])
        if not isinstance(cuda, (list, tuple)) or not all(
                isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.dim() == 1 for c in cuda):
            raise bad("rng", "holds CUDA generator states that are not byte tensors")
    if "optimizer" in st:
        _check_optimizer_state(st["optimizer"], optimizer, bad)


def _check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer | None, bad) -> None:
    """A saved ``optimizer.state_dict()``: groups listing parameter indices, per-parameter state of tensors
    and numbers; with ``optimizer``, the same group sizes and each state tensor the shape of its parameter
    (or a scalar), so that ``load_state_dict`` and the next step cannot fail on it."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(_count(i) for i in g["params"])
            for g in groups):
        raise bad("optimizer", "is not an optimizer state (param_groups of parameter indices, state)")
    params: dict[int, torch.Size | None] = {i: None for g in groups for i in g["params"]}
    if optimizer is not None:
        mine = optimizer.param_groups
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
            raise bad("optimizer", "has other parameter groups than this model's optimizer")
        params = {i: p.shape for g, m in zip(groups, mine) for i, p in zip(g["params"], m["params"])}
    for i, entry in state.items():
        if i not in params or not isinstance(entry, dict):
            raise bad("optimizer", f"holds state for parameter {quote(i)}, which is in none of its groups")
        for name, v in entry.items():
            ok = isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and (
                v.dim() == 0 or params[i] is None or v.shape == params[i]))
            if not ok:
                raise bad("optimizer", f"holds {name!r} of parameter {i} with another shape than the parameter")


def mark_latest(run_dir: str | Path, name: str) -> None:
    atomic_write_text(Path(run_dir) / LATEST, name + "\n")
