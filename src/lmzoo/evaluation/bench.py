"""Speed measurements behind ``lmzoo bench``: a training step and batch-1 decoding, plus the device's own
limits (matmul FLOP/s, copy bandwidth) to read them against. Each returns a JSON-able dict.

The training step is the fast path of docs/performance.md: vocabulary padded to a multiple of 128,
bf16 autocast over float32 master weights, SDPA attention (flash / cuDNN on a GPU), fused AdamW
on CUDA, the model compiled with ``torch.compile`` (forward and backward graphs; falls back to
eager with a one-line message when compilation fails), optionally the chunked cross-entropy.
Batches are drawn once, on the device, so the figure is the model's, not the disk's.
Timing: ``warmup`` steps (compilation included), then ``repeats`` blocks of ``steps`` steps, each between
two device synchronizations (none inside a block); the figures are the median block with the fastest and
slowest beside it, because one sample on a shared machine is noise. Defaults follow the device: bf16 on a
GPU that has it, float32 elsewhere (a CPU emulates bf16 slowly); sequence and decode lengths fit the preset's
context.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from lmzoo.common import resolve_device, resolve_dtype
from lmzoo.errors import ConfigError
from lmzoo.train.mfu import device_peak_flops, mfu
from lmzoo.train.optimizers import make_adamw
from lmzoo.train.precision import autocast, setup_tf32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 1e9, 1),
                    cuda=torch.version.cuda, sms=p.multi_processor_count)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def _time(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls), one synchronization at each end."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, iters: int = 20) -> float:
    """Measured TFLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, device, iters) / 1e12


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-memory bandwidth in GB/s of a large copy, bytes read plus bytes written (the issue's
    convention); the ceiling a memory-bound decode step is measured against."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), device, iters) / 1e9


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def sdpa_preference(name: str | None):
    """A context preferring one SDPA kernel (the others stay allowed as fallbacks, in torch's order);
    None: torch's own choice. On Hopper, cuDNN's attention can beat FlashAttention-2."""
    if name is None:
        return contextlib.nullcontext()
    if name not in SDPA_BACKENDS:
        raise ConfigError(f"unknown SDPA backend {name!r}; choose from {', '.join(SDPA_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    order = [kinds[name]] + [k for n, k in kinds.items() if n != name]
    return sdpa_kernel(order, set_priority=True)


def spread(tokens_per_s: list[float]) -> dict[str, float]:
    """The fastest and slowest of repeated measurements, and their range as a percentage of the median."""
    mid = statistics.median(tokens_per_s)
    lo, hi = min(tokens_per_s), max(tokens_per_s)
    return {"tokens_per_s_min": lo, "tokens_per_s_max": hi, "spread_pct": 100 * (hi - lo) / mid if mid else 0.0}


def time_train_steps(
    model: torch.nn.Module,
    vocab_size: int,
    batch: int,
    seq: int,
    steps: int,
    warmup: int = 5,
    compile: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    lr: float = 6e-4,
    seed: int = 0,
    n_batches: int = 4,
    sdpa: str | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Time full training steps of any model whose ``forward(x, y)[1]`` is the loss (an lmzoo LMOutput
    or nanoGPT's ``(logits, loss)``). Fixed random batches (``n_batches`` of them, cycled) drawn on
    the device from ``seed``; returns timing (``repeats`` blocks of ``steps``: the median with its
    spread, :func:`spread`) and the loss after every step. ``sdpa`` prefers one attention kernel
    (:func:`sdpa_preference`)."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    data = torch.randint(0, vocab_size, (n_batches, batch, seq + 1), generator=g).to(device)
    xs, ys = data[..., :-1].contiguous(), data[..., 1:].contiguous()
    opt = make_adamw(model, lr, (0.9, 0.95), 0.1)  # fused kernel on CUDA
    fwd = model
    compiled = False
    if compile:
        torch._dynamo.reset()  # a fresh graph, traced under this run's settings (e.g. the SDPA preference)
        fwd, compiled = torch.compile(model, dynamic=False), True  # static shapes: no symbolic batch
    ctx = autocast(device, dtype)
    losses: list[torch.Tensor] = []

    def step(i: int) -> None:
        x, y = xs[i % n_batches], ys[i % n_batches]
        with sdpa_preference(sdpa):
            with ctx:
                loss = fwd(x, y)[1]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    compile_error = None
    t0 = time.perf_counter()
    try:
        for i in range(warmup):
            step(i)
        sync(device)
    except Exception as e:  # noqa: BLE001 - any compiler failure: report it, measure eager
        if not compiled:
            raise
        compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"lmzoo bench: torch.compile failed ({compile_error}); measuring eager", file=sys.stderr)
        fwd, compiled, losses = model, False, []
        for i in range(warmup):
            step(i)
        sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block_s = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(warmup + r * steps, warmup + (r + 1) * steps):
            step(i)
        sync(device)
        block_s.append((time.perf_counter() - t0) / max(steps, 1))
    dt = statistics.median(block_s)
    out = {
        "batch": batch, "seq": seq, "steps": steps, "repeats": repeats, "compiled": compiled,
        "dtype": str(dtype).replace("torch.", ""), "sdpa": sdpa,
        "step_ms": 1000 * dt, "tokens_per_s": batch * seq / dt, **spread([batch * seq / t for t in block_s]),
        "warmup_s": warmup_s, "losses": [float(v) for v in torch.stack(losses).float().cpu()] if losses else [],
    }
    if compile_error:
        out["compile_error"] = compile_error
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def bench_train(
    preset: str = "gpt2",
    batch: int = 12,
    seq: int | None = None,
    steps: int = 20,
    warmup: int = 5,
    compile: bool | None = None,
    dtype: str | None = None,
    device: str | None = None,
    vocab_multiple: int = 128,
    ce_chunk: int = 0,
    peak_flops: float | None = None,
    seed: int = 0,
    model_args: dict[str, Any] | None = None,
    sdpa: str | None = None,
    repeats: int = 5,
) -> dict[str, Any]:
    """tokens/s (median of ``repeats`` blocks, with the spread), step time and MFU of ``preset``'s training
    step (see the module docstring). ``seq`` defaults to the preset's context (at most 1024), ``dtype`` to
    the device's (bf16 on a GPU that has it, else float32)."""
    from lmzoo.models import PRESETS, build, family_class, preset_config

    if batch <= 0 or (seq is not None and seq <= 0) or steps <= 0 or warmup < 0 or repeats <= 0:
        raise ConfigError("batch, seq, steps and repeats must be positive, warmup >= 0")
    dev = resolve_device(device)
    setup_tf32(dev, True)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; see `lmzoo info --list`")
    fields = family_class(PRESETS[preset][0]).config_class.field_names()
    args = dict(model_args or {})
    if seq is None:
        seq = min(1024, args.get("block_size") or getattr(preset_config(preset, **args), "block_size", None) or 1024)
    args.setdefault("block_size", seq)
    if "vocab_multiple" in fields:  # families without the fields keep their vocabulary and plain loss
        args.setdefault("vocab_multiple", vocab_multiple)
    if "ce_chunk" in fields:
        args.setdefault("ce_chunk", ce_chunk)
    torch.manual_seed(seed)
    model = build(preset, **args).to(dev)
    compile = dev.type == "cuda" if compile is None else compile
    res = time_train_steps(
        model, model.config.vocab_size, batch, seq, steps, warmup, compile, resolve_dtype(dtype or "auto", dev),
        seed=seed, sdpa=sdpa, repeats=repeats,
    )
    fpt = model.flops_per_token(seq)
    peak, name = device_peak_flops(dev, peak_flops)
    res.update(what="train", preset=preset, device=name, params=model.num_params(),
               vocab_multiple=args.get("vocab_multiple", 1), ce_chunk=args.get("ce_chunk", 0), flops_per_token=fpt,
               model_tflops=fpt * res["tokens_per_s"] / 1e12, mfu=mfu(fpt, res["tokens_per_s"], peak))
    return res


def bench_generate(
    preset: str = "gpt2",
    new_tokens: int | None = None,
    prompt_len: int = 16,
    batch: int = 1,
    dtype: str | None = None,
    device: str | None = None,
    compile: bool | None = None,
    seed: int = 0,
    model_args: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
    prompts: list[list[int]] | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Greedy decoding with the static cache (lmzoo.decoding.static) of a random-weight ``preset`` (or of
    ``model``; ``prompts`` replace the random ones): tokens/s (median of ``repeats`` runs, with the spread)
    and memory-bandwidth utilization (weight bytes read per step x steps/s ÷ copy GB/s). ``new_tokens``
    defaults to 256 or what the context leaves after the prompt; ``dtype`` to the device's."""
    from lmzoo.decoding.static import generate_static
    from lmzoo.models import build

    if (new_tokens is not None and new_tokens <= 0) or prompt_len <= 0 or batch <= 0 or repeats <= 0:
        raise ConfigError("new_tokens, prompt_len, batch and repeats must be positive")
    dev = resolve_device(device)
    if model is None:
        torch.manual_seed(seed)
        model = build(preset, **(model_args or {}))
    if new_tokens is None:  # what fits the context after the longest prompt
        room = model.max_positions()
        longest = max(map(len, prompts)) if prompts else prompt_len
        new_tokens = 256 if room is None else min(256, room - longest)
        if new_tokens <= 0:
            raise ConfigError(f"a prompt of {longest} tokens leaves no room in the model's {room} positions")
    model = model.to(dev, resolve_dtype(dtype or "auto", dev)).eval()
    if prompts is None:
        g = torch.Generator().manual_seed(seed)
        prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    compile = dev.type == "cuda" if compile is None else compile

    def run() -> list[list[int]]:
        return generate_static(model, prompts, new_tokens, compile=compile)

    compile_error = None
    t0 = time.perf_counter()
    try:
        run()  # warm-up: compilation and CUDA-graph capture for these shapes
    except Exception as e:  # noqa: BLE001 - any compiler failure: report it, measure eager
        if not compile:
            raise
        compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"lmzoo bench: compiling the decode step failed ({compile_error}); measuring eager", file=sys.stderr)
        compile = False
        run()
    warmup_s = time.perf_counter() - t0
    sync(dev)
    run_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run()
        sync(dev)
        run_s.append(time.perf_counter() - t0)
    dt = statistics.median(run_s)
    bw = copy_bandwidth(dev, 1 << 30, 20) if dev.type == "cuda" else copy_bandwidth(dev, 1 << 27, 5)
    wbytes = model.weight_bytes()
    steps_per_s = new_tokens / dt
    return {
        "what": "generate", "preset": preset, "device": device_info(dev)["name"], "batch": batch,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "compiled": compile,
        "tokens_per_s": batch * steps_per_s, **spread([batch * new_tokens / t for t in run_s]),
        "ms_per_token": 1000 / steps_per_s, "warmup_s": warmup_s,
        "weight_bytes": wbytes, "copy_gb_s": bw, "bandwidth_limit_tokens_per_s": bw * 1e9 / wbytes,
        "bandwidth_util": steps_per_s * wbytes / (bw * 1e9), "first_tokens": tokens[0][:32],
        **({"compile_error": compile_error} if compile_error else {}),
    }
