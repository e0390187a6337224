"""LoRA: injection by pattern, exact identity at init, merge/unmerge, adapters on their own, peft export."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.peft import (
    apply_lora,
    export_peft,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_params,
    unmerge_lora,
)
from lmzoo.peft.lora import lora_modules


def _model(preset="gpt2-debug", **kw):
    torch.manual_seed(0)
    return lmzoo.build(preset, **kw).eval()


def _randomize_b(model):
    g = torch.Generator().manual_seed(1)
    for _, m in lora_modules(model):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _idx(vocab=97, T=12):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(2))


def test_zero_b_init_equals_base_exactly():
    model = _model()
    idx = _idx()
    base = model(idx).logits
    apply_lora(model, target="attn.qkv|attn.proj|mlp.*", r=4)
    assert torch.equal(model(idx).logits, base)


def test_trainable_count_is_adapter_params_only():
    model = _model()  # gpt2-debug: C=32, 4 heads, 2 kv heads (qkv out = 64), hidden 128, 2 layers
    report = apply_lora(model, target="attn.qkv|mlp.fc", r=4)
    per_layer = 4 * (32 + 64) + 4 * (32 + 128)  # r * (in + out) for qkv and fc
    assert report["trainable"] == trainable_params(model) == 2 * per_layer
    assert report["modules"] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_merge_then_unmerge_restores_weights_and_merged_logits_match():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, target="attn.qkv|attn.proj|mlp.*", r=4, alpha=8)
    _randomize_b(model)
    idx = _idx()
    unmerged = model(idx).logits
    merge_lora(model)
    merged = model(idx).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    unmerge_lora(model)
    for name, m in lora_modules(model):
        assert (m.base.weight - before[f"{name}.weight"]).abs().max() <= 1e-6


def test_pattern_matching_nothing_names_available_modules():
    with pytest.raises(ConfigError, match=r"matches no Linear module; available: .*blocks\.\{i\}\.attn\.qkv"):
        apply_lora(_model(), target="q_proj")


def test_adapter_saves_alone_and_loads_into_a_fresh_base(tmp_path):
    model = _model()
    apply_lora(model, target="attn.qkv|mlp.proj", r=2)
    _randomize_b(model)
    idx = _idx()
    want = model(idx).logits
    save_adapter(model, tmp_path / "ad")
    size = sum(p.stat().st_size for p in (tmp_path / "ad").iterdir())
    assert size < 20_000  # only A and B: a few KB
    fresh = load_adapter(_model(), tmp_path / "ad")
    assert torch.allclose(fresh(idx).logits, want, atol=0, rtol=0)


def test_adapter_for_another_base_is_refused_naming_the_tensor(tmp_path):
    model = _model()
    apply_lora(model, target="attn.qkv", r=2)
    save_adapter(model, tmp_path / "ad")
    other = _model(n_embd=48, n_head=4)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.qkv\.lora_A' has shape \(2, 32\).*\(2, 48\)"):
        load_adapter(other, tmp_path / "ad")


def test_merged_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmzoo.peft import export_merged_hf

    model = _model(n_kv_head=4)
    apply_lora(model, target="attn.qkv|mlp.*", r=4)
    _randomize_b(model)
    idx = _idx()
    want = model(idx).logits
    export_merged_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = hf(idx).logits
    assert (got - want).abs().max() <= 1e-4


def _tiny_hf(kind, path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32,
        )
        hf = transformers.LlamaForCausalLM(cfg)
    hf.save_pretrained(path)
    return transformers.AutoModelForCausalLM


@pytest.mark.parametrize(
    "kind,target", [("gpt2", "attn.qkv|attn.proj|mlp.*"), ("llama", "attn.qkv|attn.proj|mlp.down")]
)
def test_peft_loads_exported_adapter_with_same_logits(tmp_path, kind, target):
    peft = pytest.importorskip("peft", reason="peft is needed to load the exported adapter (pip install peft)")
    auto = _tiny_hf(kind, tmp_path / "base")
    model = lmzoo.from_hf(tmp_path / "base").eval()
    apply_lora(model, target=target, r=4, alpha=8)
    _randomize_b(model)
    idx = _idx()
    with torch.no_grad():
        want = model(idx).logits
    export_peft(model, tmp_path / "adapter")
    hf = auto.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = hf(idx).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(idx).logits
    assert (base_logits - want).abs().max() > 1e-3  # the adapter really changes the output
    assert (got - want).abs().max() <= 1e-4
