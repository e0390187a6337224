"""One home for the small helpers every part of lmzoo needs: the device, the dtype, and a byte count
written for people.

    device = resolve_device("auto")            # cuda if there is one, else mps, else cpu
    dtype = resolve_dtype("bf16", device)      # names, short names, torch dtypes, or "auto"
    fmt_bytes(3 * 2**30)                       # '3.0 GB'
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from lmzoo.errors import ConfigError

# the floating-point dtypes a user may name, with their short names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): cuda if available, else mps, else cpu; otherwise the named device, checked
    to exist (a ConfigError naming it if not)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: unknown device {str(name)[:100]!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device: mps was asked for but this machine has no MPS device")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype | None:
    """A floating-point torch dtype from a name (``float32``, ``bfloat16``, ``float16``, ``fp32``,
    ``bf16``, ``fp16``, ``torch.bfloat16``), a torch dtype, or None (None back: keep what is there).
    ``auto``: bfloat16 on a CUDA device that supports it, else float32. ConfigError for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point dtype")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    name = SHORT_DTYPES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {str(dtype)[:100]!r}; choose from float32, bfloat16, float16 "
                          "(or fp32, bf16, fp16)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'``."""
    return str(dtype).removeprefix("torch.")


def fmt_bytes(n: float) -> str:
    """A byte count for people: ``'512 B'``, ``'1.5 KB'``, ``'3.0 GB'`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PB"


def smoke_mode() -> bool:
    """``LMZOO_SMOKE=1``: the documentation's commands run at a tiny budget (their smoke tests set it):
    training steps / 1000, one evaluation batch, built-in corpora cut to a few documents, one bench repeat."""
    return os.environ.get("LMZOO_SMOKE", "") not in ("", "0")


def optional_import(module: str, extra: str, needed_for: str, package: str | None = None) -> ModuleType:
    """``module`` imported, or a one-line ConfigError naming the lmzoo extra that installs it.

    ``optional_import("scipy.optimize", "scaling", "the scaling-law fit")`` raises, where scipy is
    missing, ``the scaling-law fit needs scipy: pip install 'lmzoo[scaling]'``. ``package``: the name
    pip knows when it differs from the module's (``nvidia-ml-py`` for ``pynvml``).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        name = package or module.partition(".")[0]
        raise ConfigError(f"{needed_for} needs {name}: pip install 'lmzoo[{extra}]'") from None


def pyplot(needed_for: str, extra: str = "logging") -> ModuleType:
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: no display needed), or the one-line
    ConfigError of :func:`optional_import` naming the extra that installs matplotlib."""
    optional_import("matplotlib", extra, needed_for).use("Agg")
    return importlib.import_module("matplotlib.pyplot")
