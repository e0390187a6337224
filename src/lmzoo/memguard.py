"""Refuse to build a model that cannot fit, before allocating it.

A config read from an untrusted ``config.json`` (or typed by hand) can ask for a model far larger
than the machine: building it would swap the machine to a halt or get the process killed by the
kernel's OOM killer, with no message. So every path that builds a model from a config
(:func:`lmzoo.load`, :func:`lmzoo.from_hf`, the trainer) first estimates its memory here and
raises :class:`ModelTooLargeError` (one line: the estimate, the memory available, what to do).

The estimate:

1. a quick lower bound from the sizes alone (``n_layer * n_embd**2 + vocab_size * n_embd``
   parameters), so an absurd config (10⁹ layers, width 10¹²) is refused without building anything;
2. an over-estimate from the sizes (attention, MLP or every expert, embeddings, position tables): a
   model that fits even so passes at once (the common case);
3. otherwise (near the limit) the model is built on the **meta device** (shapes, no storage) and its parameters and
   buffers counted. A deep model is built with one and two periods of its layer pattern and the
   count extrapolated linearly, so the estimate costs milliseconds whatever the depth.

Training needs more than the weights: gradients and AdamW's two moments, i.e. about 4x the weights
in float32 (activations come on top and are not counted: the estimate is a lower bound).

Available memory: on CUDA, ``torch.cuda.mem_get_info``; on the CPU the smaller of ``MemAvailable``
(``psutil`` or ``/proc/meminfo``) and the room left under a cgroup memory limit (containers).
Set ``LMZOO_NO_MEMORY_CHECK=1`` (or pass ``check_memory=False``) to skip the check: for experts who
know better (swap, unified memory, a model that will be quantized right after loading).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from lmzoo.common import fmt_bytes
from lmzoo.errors import ConfigError

ENV = "LMZOO_NO_MEMORY_CHECK"
_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


class ModelTooLargeError(ConfigError):
    """The model's estimated memory exceeds what the device has available (exit code 2)."""


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 (or v1) memory limit, or None when unlimited / unknown."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a new model may take on ``device``, or None when it cannot be told (no check then)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:  # the driver's free memory plus what PyTorch's caching allocator holds but no tensor uses
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
        except Exception:  # no driver, a device index that does not exist: let torch report it later
            return None
    if device.type != "cpu":
        return None
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except Exception:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def _int(cfg: Any, name: str, default: int = 0) -> int:
    v = getattr(cfg, name, default)
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def lower_bound_params(cfg: Any) -> int:
    """Parameters every family has at least: the embedding and one d x d matrix per layer."""
    d, n_layer, vocab = _int(cfg, "n_embd"), _int(cfg, "n_layer"), _int(cfg, "vocab_size")
    return n_layer * d * d + vocab * d


class MetaWithoutInit(TorchFunctionMode):
    """``with torch.device("meta")`` that also skips in-place initializers on meta tensors.

    Plain meta construction runs ``normal_`` & co. through torch's decompositions, whose first use
    imports torch._dynamo (seconds): too slow for a check made before every load. Counting needs
    shapes only, so an in-place op (name ending in ``_``) on a meta tensor just returns it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # nn.init functions take ``tensor=`` too
        if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        if func in _device_constructors() and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def generous_params(cfg: Any) -> int:
    """An over-estimate from the sizes alone: attention 4d^2, MLP or experts 3 d h, embeddings and tables."""
    d, n_layer, vocab = _int(cfg, "n_embd"), _int(cfg, "n_layer"), _int(cfg, "vocab_size")
    hidden = max(_int(cfg, "mlp_hidden"), _int(cfg, "d_inner"), 4 * d, _int(cfg, "expand") * d)
    experts = max(1, _int(cfg, "n_experts"))
    per_layer = 4 * d * d + 3 * d * hidden * (experts + 1) + 4 * d * (_int(cfg, "d_state") + _int(cfg, "d_conv") + 4)
    tables = _int(cfg, "block_size") * (d + 2 * _int(cfg, "head_dim", d)) + _int(cfg, "mem_len") * d
    return n_layer * per_layer + 2 * vocab * d + tables


def _count_meta(family: str, cfg: Any) -> int:
    from lmzoo.models import build_model

    with MetaWithoutInit():
        model = build_model(family, cfg)
    seen: set[int] = set()
    n = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    return n


def count_elements(family: str, cfg: Any) -> int:
    """Parameter + buffer elements of the model ``cfg`` builds, counted on the meta device."""
    n_layer = _int(cfg, "n_layer")
    period = 1
    for name, v in vars(cfg).items():  # layer patterns (attention every k layers, MoE every m, ...)
        if name.endswith("_every") and isinstance(v, int) and 0 < v <= 64:
            period = math.lcm(period, v)
    if n_layer <= 2 * period or not hasattr(cfg, "replace"):
        return _count_meta(family, cfg)
    try:
        one, two = (_count_meta(family, cfg.replace(n_layer=k * period)) for k in (1, 2))
    except ConfigError:
        return _count_meta(family, cfg)
    per_period = two - one
    return one + per_period * (n_layer - period) // period


def check_fits(family: str, cfg: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               training: bool = False, where: str = "", check: bool = True) -> int | None:
    """Raise ModelTooLargeError when the model of ``cfg`` would not fit on ``device``.

    Returns the estimate in bytes (None when the check is skipped or memory cannot be told).
    ``training``: weights + gradients + AdamW moments (float32 moments unless ``dtype`` is bf16).
    """
    if not check or os.environ.get(ENV, "").strip() not in ("", "0"):
        return None
    device = torch.device(device)
    avail = available_bytes(device)
    if avail is None:
        return None
    per = _BYTES.get(dtype or torch.float32, 4)
    per_param = per * 4 if training else per  # weights, grads, exp_avg, exp_avg_sq
    prefix = f"{where}: " if where else ""
    quick = lower_bound_params(cfg) * per_param
    if quick > avail:
        raise ModelTooLargeError(_message(prefix, family, lower_bound_params(cfg), quick, avail, device, dtype,
                                          training, at_least=True))
    rough = generous_params(cfg)
    if rough * per_param * 2 <= avail:  # fits with room to spare: skip the exact count
        return rough * per_param
    n = count_elements(family, cfg)  # near the limit: count exactly (shapes only, on the meta device)
    est = n * per_param
    if est > avail:
        raise ModelTooLargeError(_message(prefix, family, n, est, avail, device, dtype, training))
    return est


def _message(prefix: str, family: str, n: int, est: int, avail: int, device: torch.device,
             dtype: torch.dtype | None, training: bool, at_least: bool = False) -> str:
    what = "weights, gradients and AdamW state" if training else "weights"
    dt = str(dtype or torch.float32).removeprefix("torch.")
    tips = "use bfloat16 (--dtype=bfloat16 / --param_dtype=bfloat16), quantize to NF4 (lmzoo finetune " \
        "--method=qlora), shard it over GPUs (--parallel.mode=fsdp)" if training else \
        "load it in bfloat16 (dtype=torch.bfloat16), quantize to NF4 (QLoRA: lmzoo finetune --method=qlora), " \
        "shard it over GPUs (FSDP) or pick a smaller config"
    return (f"{prefix}the {family} model needs {'at least ' if at_least else ''}about {fmt_bytes(est)} "
            f"({n:.3g} parameters, {what} in {dt}) but {device.type} has {fmt_bytes(avail)} available; {tips}; "
            f"set {ENV}=1 to try anyway")


class BatchTooLargeError(ConfigError):
    """A micro-batch whose activations (a lower bound) cannot fit beside the model (exit code 2)."""


def batch_lower_bound(cfg: Any, batch_size: int, block_size: int, dtype: torch.dtype | None = None,
                      stages: int = 1) -> tuple[int, int]:
    """(device bytes, CPU bytes) one training micro-batch needs at the least, beyond the weights.

    Device: every block keeps at least its input, ``(batch, block, width)`` in the compute dtype, for the
    backward pass (activation checkpointing keeps exactly that); a pipeline stage holds ``n_layer / stages``
    blocks. CPU: the loader's ``(batch, block + 1)`` int64 window array and the input and target id tensors
    made from it. Real use is higher (attention, MLP and logits activations), so a batch refused here
    cannot fit."""
    width = max(_int(cfg, "n_embd"), _int(cfg, "d_model"))
    layers = max(1, _int(cfg, "n_layer") // max(1, stages))
    tokens = batch_size * block_size
    device = tokens * width * layers * _BYTES.get(dtype or torch.float32, 4) + 2 * tokens * 8
    cpu = batch_size * (block_size + 1) * 8 + 2 * tokens * 8
    return device, cpu


def check_batch_fits(cfg: Any, batch_size: int, block_size: int, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, model_bytes: int | None = None, stages: int = 1,
                     where: str = "", check: bool = True) -> None:
    """Raise BatchTooLargeError when one micro-batch of ``batch_size x block_size`` tokens cannot fit
    beside the model's ``model_bytes`` (weights, gradients, optimizer state: :func:`check_fits`'s estimate).

    Called before a run writes anything, so ``--batch_size=1000000000`` is one line instead of a NumPy
    allocation error after the run's config and metrics were written."""
    if not check or os.environ.get(ENV, "").strip() not in ("", "0") or not block_size:
        return
    device = torch.device(device)
    need_device, need_cpu = batch_lower_bound(cfg, batch_size, block_size, dtype, stages)
    # (device, bytes of the batch there, bytes already taken there by the model)
    if device.type == "cpu":
        checks = [(device, need_device + need_cpu, model_bytes or 0)]
    else:
        checks = [(device, need_device, model_bytes or 0), (torch.device("cpu"), need_cpu, 0)]
    for dev, need, base in checks:
        avail = available_bytes(dev)
        if avail is not None and base + need > avail:
            prefix = f"{where}: " if where else ""
            beside = f" beside the model's {fmt_bytes(base)}" if base else ""
            raise BatchTooLargeError(
                f"{prefix}a micro-batch of batch_size {batch_size:,} x block_size {block_size:,} needs at least "
                f"about {fmt_bytes(need)} on {dev.type}{beside} but {dev.type} has {fmt_bytes(avail)} available; "
                f"lower --batch_size (raise --grad_accum to keep the tokens per step) or --block_size; set {ENV}=1 "
                "to try anyway")
