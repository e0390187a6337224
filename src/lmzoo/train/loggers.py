"""Where run metrics go: JSONL always (:mod:`.metrics`), TensorBoard and Weights & Biases on request.

Every logger takes the same records as :class:`~lmzoo.train.metrics.MetricsLogger`:
``log(kind, step, **values)`` with kind "train", "eval" or "event". TensorBoard and W&B get each
numeric value of train and eval records as a scalar named ``<kind>/<key>`` (``train/loss``,
``train/mfu``, ``eval/val_loss``); events become text (TensorBoard) or summary values (W&B).

On CUDA, :func:`system_metrics` adds GPU memory (allocated, reserved, peak) and, when the
``pynvml`` package (nvidia-ml-py) is installed, utilization, power and temperature through NVML.
Without pynvml those three fields are simply absent.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import torch

from lmzoo.common import optional_import


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoardLogger:
    """Real TensorBoard event files in ``log_dir`` (``tensorboard --logdir <out_dir>/tb``)."""

    def __init__(self, log_dir: str | Path, config: dict[str, Any] | None = None):
        tb = optional_import("torch.utils.tensorboard", "logging", "tensorboard=true", package="tensorboard")
        self.writer = tb.SummaryWriter(str(log_dir))
        if config is not None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, kind: str, step: int, **values: Any) -> None:
        if kind == "event":
            text = ", ".join(f"{k}={v}" for k, v in values.items())
            self.writer.add_text("events", text, step)
            return
        for k, v in _scalars(values).items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """Weights & Biases; ``mode="offline"`` needs no account (``wandb sync <out_dir>/wandb`` later).

    The run id is kept in ``<out_dir>/wandb_id`` so a resumed run continues the same W&B run.
    """

    def __init__(self, out_dir: str | Path, project: str, name: str, mode: str, config: dict[str, Any]):
        wandb = optional_import("wandb", "wandb", "wandb=true")
        out_dir = Path(out_dir)
        id_file = out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=name, id=run_id, resume="allow", dir=str(out_dir), mode=mode,
            config=config, settings=wandb.Settings(silent=True),
        )

    def log(self, kind: str, step: int, **values: Any) -> None:
        if kind == "event":
            for k, v in values.items():
                if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                    self.run.summary[f"{values.get('event', 'event')}/{k}"] = v
            return
        self.run.log({f"{kind}/{k}": v for k, v in _scalars(values).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fans each record out to every logger; the JSONL one first."""

    def __init__(self, *loggers):
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, kind: str, step: int, **values: Any) -> None:
        for lg in self.loggers:
            lg.log(kind, step, **values)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


# -- device readings ---------------------------------------------------------------------------

_NVML: Any = None  # the pynvml module once initialized; False when unavailable


def _nvml():
    """The initialized ``pynvml`` module, or False where NVML cannot answer (tried once)."""
    global _NVML
    if _NVML is None:
        try:
            import pynvml
        except ImportError:  # the nvml extra is not installed: the fields are left out
            _NVML = False
            return _NVML
        try:
            pynvml.nvmlInit()
            _NVML = pynvml
        except pynvml.NVMLError:  # no driver (NVMLError_LibraryNotFound) or no GPU: left out too
            _NVML = False
    return _NVML


def system_metrics(device: torch.device) -> dict[str, float]:
    """GPU memory in GiB (allocated, reserved, peak allocated) and, with pynvml, utilization (%),
    power (W) and temperature (C). Empty on CPUs."""
    if device.type != "cuda":
        return {}
    gib = 1024**3
    out = {
        "mem_allocated_gb": torch.cuda.memory_allocated(device) / gib,
        "mem_reserved_gb": torch.cuda.memory_reserved(device) / gib,
        "mem_peak_gb": torch.cuda.max_memory_allocated(device) / gib,
    }
    nv = _nvml()
    if nv:
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            h = nv.nvmlDeviceGetHandleByIndex(index)
            out["gpu_util_pct"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            out["gpu_temp_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        except Exception:
            pass
    return out
