"""Int8 weight-only linears (lmzoo.quant.int8) against the float layers they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.quant.int8 import QMAX, Int8Linear, quantize_model, quantize_rows


def test_row_quantization_error_is_at_most_half_a_step_of_its_row():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different scales
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == QMAX
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("compute_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_the_float_product_with_its_dequantized_weight(compute_dtype, tol, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    layer = Int8Linear(lin, compute_dtype)
    x = torch.randn(3, 5, 96)
    ref = nn.functional.linear(x, layer.dequantize(), lin.bias)
    y = layer(x)
    assert y.shape == (3, 5, 40) and y.dtype == torch.float32  # the input's dtype back
    assert (y - ref).abs().max() <= tol * ref.abs().max()
    # and close to the original layer: per-row int8 keeps ~2 significant digits of every product
    assert (y - lin(x)).abs().max() <= 0.03 * lin(x).abs().max()


def test_int8_model_logits_stay_close_and_its_weights_take_a_quarter_of_float32():
    torch.manual_seed(0)
    model = lmzoo.build("llama-debug", tie_embeddings=True).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    ref = model(x).logits
    blocks = sum(model.get_submodule(n).weight.numel() for n in lmzoo.quant.quantizable_linears(model))
    before = model.num_params()
    names = quantize_model(model)
    assert "head" in names and all(isinstance(model.get_submodule(n), Int8Linear) for n in names)
    # int8 weights count as the parameters they stand for; the tied head becomes an int8 copy of the table
    assert model.num_params() == before + model.embed.weight.numel()
    int8 = [model.get_submodule(n) for n in names]
    assert sum(m.qweight.numel() for m in int8) == blocks + model.head.qweight.numel()
    # the model's weight bytes hold each int8 layer's stored bytes, not only the float parameters left
    rest = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert model.weight_bytes() == rest + sum(m.weight_bytes() for m in int8)
    out = model(x).logits
    assert torch.equal(out.argmax(-1), ref.argmax(-1)) or (out - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model)


def test_an_int8_checkpoint_saves_and_loads_with_its_int8_layers(tmp_path):
    torch.manual_seed(0)
    model = lmzoo.build("llama-debug").eval()
    quantize_model(model, compute_dtype=torch.float32)
    lmzoo.save(model, tmp_path / "ckpt")
    back = lmzoo.load(tmp_path / "ckpt").eval()
    assert back.quantization == model.quantization
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(back(x).logits, model(x).logits)


def test_load_any_refuses_an_unknown_quantization_in_one_line(tmp_path):
    from lmzoo.formats.load import load_any

    with pytest.raises(ConfigError, match="quantize='int4'"):
        load_any(tmp_path, quantize="int4")


def test_load_any_and_lmzoo_generate_take_int8_and_bf16(tmp_path, capsys):
    from lmzoo.cli.app import main
    from lmzoo.formats.load import load_any
    from lmzoo.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    torch.manual_seed(0)
    lmzoo.save(lmzoo.build("llama-debug", vocab_size=tok.vocab_size), tmp_path / "ckpt", tokenizer=tok)
    model, _ = load_any(tmp_path / "ckpt", quantize="int8")
    assert isinstance(model.head, Int8Linear) and model.quantization["method"] == "int8"
    args = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "ab", "--max-new-tokens", "4",
            "--temperature", "0"]
    assert main([*args, "--quantize", "int8", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main([*args, "--quantize", "int4"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
