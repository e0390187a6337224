"""Model FLOPs utilization (MFU, Chowdhery et al. 2022, "PaLM", appendix B).

    MFU = (model FLOPs per token x tokens per second) / (the device's peak FLOP/s)

"Model FLOPs" count only what the model needs (``model.flops_per_token(T)``: 6 N for the
weight matmuls of forward + backward plus 12 L d T for attention), not what an implementation
spends: recomputation by activation checkpointing does not raise MFU. The peak is the dense
(no 2:4 sparsity) bf16/fp16 tensor-core figure from the vendor's data sheet, the convention of
PaLM and nanoGPT, whatever dtype the run uses. A float32 run on a GPU is thus measured against
the bf16 peak too, which shows how much it leaves on the table.

CPUs have no such table (the peak depends on cores, clocks and vector units): MFU is logged on a
CPU only when ``peak_flops`` is given.

MFU is per device. A run over ``world_size`` processes (DDP, FSDP, TP, PP: one device each)
counts the tokens of all of them per second, so their sum of peaks is the denominator:
``peak_flops x world_size``. Two ranks that each run as fast as one process alone thus show
that process's MFU, not twice it.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), dense bf16 peak FLOP/s); the first match wins,
# so specific names come before their prefixes. Sources: NVIDIA / AMD data sheets.
GPU_PEAK_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),  # per B200 GPU in a GB200 superchip
    ("B200", 2.25e15),
    ("H200", 989e12),  # SXM (same tensor cores as H100 SXM)
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM; H100 80GB HBM3
    ("GH200", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),  # AWS g5; NVIDIA publishes no sheet: an estimate from its clocks
    ("A10", 125e12),
    ("A30", 165e12),
    ("A40", 149.7e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 154.8e12),
    ("RTX 5090", 209.5e12),
    ("RTX 4090", 165.2e12),  # fp16/bf16 tensor with fp32 accumulation, dense
    ("RTX 4080", 97.5e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 (no bf16 on Volta)
    ("T4", 65e12),  # fp16 (no bf16 on Turing)
    ("MI300X", 1307e12),
    ("MI325X", 1307e12),
    ("MI250X", 383e12),
]


def lookup_peak_flops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name, or None when it is not in the table."""
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def device_peak_flops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, device name): ``override`` if given, else the GPU table; None on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        import platform

        name = platform.processor() or platform.machine() or "cpu"
    else:
        name = device.type
    if override is not None:
        return float(override), name
    if device.type == "cuda":
        return lookup_peak_flops(name), name
    return None, name


def mfu(
    flops_per_token: float, tokens_per_s: float, peak_flops: float | None, world_size: int = 1
) -> float | None:
    """Model FLOPs utilization per device in [0, 1] (None without a peak).

    ``tokens_per_s`` is the whole job's (every rank's tokens), ``peak_flops`` one device's and
    ``world_size`` the number of devices (processes) that produced those tokens.
    """
    if not peak_flops:
        return None
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return flops_per_token * tokens_per_s / (peak_flops * world_size)
