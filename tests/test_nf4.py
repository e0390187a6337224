"""NF4 (QLoRA): the 16 levels, blockwise quantization against a float64 reference, memory, QLoRA training."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.peft import apply_qlora, memory_report
from lmzoo.quant.nf4 import (
    NF4_CODE,
    NF4Linear,
    dequantize_absmax,
    dequantize_blocks,
    nf4_levels_from_normal,
    pack,
    quantize_absmax,
    quantize_blocks,
    unpack,
)

# The table printed in the QLoRA paper (appendix E) and in bitsandbytes (functional.py, NF4 map).
PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_the_16_code_values_are_the_published_normal_quantiles():
    assert list(NF4_CODE) == PUBLISHED
    derived = nf4_levels_from_normal()
    assert torch.allclose(derived, torch.tensor(PUBLISHED, dtype=torch.float64), atol=1e-6)


def _reference_nf4(w: torch.Tensor) -> torch.Tensor:
    """Float64, written independently: per block of 64, nearest level of w/absmax (argmin), then
    double-quantize the absmax (mean offset, blocks of 256, symmetric int8) and dequantize."""
    code = torch.tensor(PUBLISHED, dtype=torch.float64)
    flat = w.double().reshape(-1)
    blocks = flat.view(-1, 64)
    absmax = blocks.abs().max(dim=1).values
    idx = (blocks[..., None] / absmax[:, None, None] - code).abs().argmin(dim=-1)
    mean = absmax.mean()
    c = (absmax - mean).view(-1, 256)
    scale = c.abs().max(dim=1).values
    q = torch.round(c / scale[:, None] * 127)
    absmax_dq = (q / 127 * scale[:, None]).reshape(-1) + mean
    return (code[idx] * absmax_dq[:, None]).reshape(w.shape)


def test_quantize_dequantize_error_matches_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(512, 256) * 0.02  # 2048 blocks of 64 -> 8 second-level blocks of 256
    m = NF4Linear(torch.nn.Linear(256, 512, bias=False), compute_dtype=torch.float32)
    with torch.no_grad():
        m = NF4Linear(_linear_with(w), compute_dtype=torch.float32)
    got = m.dequantize(torch.float32).double()
    ref = _reference_nf4(w)
    assert (got - ref).abs().max() <= 1e-6 * w.abs().max()  # same indices, same scales (float32 rounding)
    err = (got - w.double()).pow(2).mean().sqrt() / w.double().pow(2).mean().sqrt()
    ref_err = (ref - w.double()).pow(2).mean().sqrt() / w.double().pow(2).mean().sqrt()
    assert abs(err - ref_err) < 1e-6
    assert 0.08 < err < 0.11  # NF4's relative RMS error on normal weights (~0.095 measured)


def _linear_with(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_pack_roundtrip_and_nibble_order():
    idx = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    assert pack(idx).tolist() == [0x12, 0xF0]
    assert torch.equal(unpack(pack(idx)), idx)


def test_double_quantization_roundtrip_is_close():
    absmax = torch.rand(1000) * 0.1 + 0.01
    q, scale, mean = quantize_absmax(absmax)
    assert q.dtype == torch.int8 and scale.numel() == 4
    assert (dequantize_absmax(q, scale, mean) - absmax).abs().max() <= scale.max() / 254 + 1e-7


def test_padding_and_exact_zero():
    w = torch.zeros(3, 5)
    w[1, 2] = 0.5
    idx, absmax = quantize_blocks(w)
    assert torch.equal(dequantize_blocks(idx, absmax, w.shape), w)


def test_quantized_model_weights_under_0_3x_of_bf16():
    # linear layers dominate, as in real LLMs (embeddings and norms stay bf16)
    model = lmzoo.build("llama-debug", n_embd=256, n_head=4, n_kv_head=4, vocab_size=64)
    report = apply_qlora(model, target="mixer.qkv|mixer.proj", r=4)
    assert report["quantized_ratio"] < 0.27  # 4.127 bits per weight / 16
    r = memory_report(model)
    assert r["ratio"] <= 0.3, r


def test_qlora_forward_close_to_base_and_only_adapters_train():
    torch.manual_seed(0)
    model = lmzoo.build("gpt2-debug").eval()
    idx = torch.randint(0, 97, (2, 16))
    base = model(idx).logits
    apply_qlora(model, target="mixer.qkv|ffn.*", r=4, compute_dtype=torch.float32)
    out = model(idx, targets=idx)
    assert (out.logits - base).abs().max() < 0.05  # 4-bit weights: close, not equal
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert not any(b.requires_grad for b in model.buffers())


def test_bitsandbytes_agrees_bit_for_bit():
    """Also runnable alone on a GPU machine: benchmarks/gpu/nf4_vs_bnb.py (one JSON line)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: bitsandbytes' NF4 kernels need one (run benchmarks/gpu/nf4_vs_bnb.py on a GPU)")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    from lmzoo.quant.nf4 import compare_with_bitsandbytes

    res = compare_with_bitsandbytes(256, 128)
    for dtype in ("float32", "bfloat16", "float16"):
        assert res[dtype]["pack_equal"] and res[dtype]["absmax_equal"], res
        assert res[dtype]["dequant_equal"] and res[dtype]["roundtrip_equal"], res


def test_info_reports_nf4_weight_memory(capsys):
    from lmzoo.cli.app import main
    from lmzoo.peft.qlora import estimate

    assert main(["info", "llama-debug", "--nf4", "--n_embd=256", "--n_head=4", "--vocab_size=64"]) == 0
    assert "NF4 (QLoRA) weights" in capsys.readouterr().out
    model = lmzoo.build("llama-debug", n_embd=256, n_head=4, n_kv_head=4, vocab_size=64)
    e = estimate(model)
    apply_qlora(model, target="mixer.qkv", r=2)
    assert e["model_bytes"] == memory_report(model)["model_bytes"] and e["ratio"] <= 0.3
