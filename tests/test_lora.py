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
    apply_lora(model, target="mixer.qkv|mixer.proj|ffn.*", r=4)
    assert torch.equal(model(idx).logits, base)


def test_trainable_count_is_adapter_params_only():
    model = _model()  # gpt2-debug: C=32, 4 heads, 2 kv heads (qkv out = 64), hidden 128, 2 layers
    report = apply_lora(model, target="mixer.qkv|ffn.fc", r=4)
    per_layer = 4 * (32 + 64) + 4 * (32 + 128)  # r * (in + out) for qkv and fc
    assert report["trainable"] == trainable_params(model) == 2 * per_layer
    assert report["modules"] == ["blocks.0.mixer.qkv", "blocks.0.ffn.fc", "blocks.1.mixer.qkv", "blocks.1.ffn.fc"]
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_merge_then_unmerge_restores_weights_and_merged_logits_match():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, target="mixer.qkv|mixer.proj|ffn.*", r=4, alpha=8)
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
    with pytest.raises(ConfigError, match=r"matches no Linear module; available: .*blocks\.\{i\}\.mixer\.qkv"):
        apply_lora(_model(), target="q_proj")


def test_adapter_saves_alone_and_loads_into_a_fresh_base(tmp_path):
    model = _model()
    apply_lora(model, target="mixer.qkv|ffn.proj", r=2)
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
    apply_lora(model, target="mixer.qkv", r=2)
    save_adapter(model, tmp_path / "ad")
    other = _model(n_embd=48, n_head=4)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.mixer\.qkv\.lora_A' has shape \(2, 32\).*\(2, 48\)"):
        load_adapter(other, tmp_path / "ad")


def test_merged_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmzoo.peft import export_merged_hf

    model = _model(n_kv_head=4)
    apply_lora(model, target="mixer.qkv|ffn.*", r=4)
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
    "kind,target", [("gpt2", "mixer.qkv|mixer.proj|ffn.*"), ("llama", "mixer.qkv|mixer.proj|ffn.down")]
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


def _mixtral_with_adapters(tmp_path, target):
    """mixtral-debug with large random weights written by to_hf, then LoRA on ``target`` with random B."""
    torch.manual_seed(0)
    model = lmzoo.build("mixtral-debug").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.2)
    lmzoo.to_hf(model, tmp_path / "base")
    apply_lora(model, target=target, r=2, alpha=4)
    g = torch.Generator().manual_seed(1)
    for _, m in lora_modules(model):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
    return model


def _exported_to_hf(tmp_path, model):
    """``model``'s adapters exported in peft format to tmp_path/adapter: (lmzoo's logits, the transformers
    base model that to_hf wrote, its logits), checked to differ (the adapters change the output)."""
    transformers = pytest.importorskip("transformers")
    idx = _idx()
    with torch.no_grad():
        want = model(idx).logits
    export_peft(model, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = hf(idx).logits
    assert (base_logits - want).abs().max() > 1e-2
    return want, hf, base_logits


@pytest.mark.parametrize("target", [
    r"experts\.\d+\.down",
    r"experts\.\d+\.(gate|up|down)",
    r"blocks\.0\.ffn\.experts\.\d+\.(gate|up|down)",  # one layer's experts; the other layer has none
    r"blocks\.0\.ffn\.experts\.\d+\.down|blocks\.1\.ffn\.experts\.\d+\.(gate|up|down)",
    r"mixer\.qkv|experts\.\d+\.(gate|up|down)",
])
def test_mixtral_expert_adapters_export_so_peft_applies_them(tmp_path, target):
    """transformers holds Mixtral's experts fused; peft converts the exported per-expert adapters onto
    them, and its logits equal lmzoo's."""
    peft = pytest.importorskip("peft")
    want, hf, base_logits = _exported_to_hf(tmp_path, _mixtral_with_adapters(tmp_path, target))
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(_idx()).logits
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("target,message", [
    (r"experts\.\d+\.gate", "not on gate"),
    (r"experts\.\d+\.up", "not on up"),
    (r"experts\.\d+\.(gate|up)", "not on gate\\+up"),  # peft loads this one and drops it: wrong logits
    (r"experts\.\d+\.(gate|down)", "not on down\\+gate"),
    (r"experts\.[01]\.(gate|up|down)", "some of the 4 experts"),
    (r"ffn\.router", "router is not a Linear layer"),
])
def test_mixtral_expert_adapters_peft_cannot_apply_are_refused(tmp_path, target, message):
    model = _mixtral_with_adapters(tmp_path, target)
    with pytest.raises(ConfigError, match=message) as e:
        export_peft(model, tmp_path / "adapter")
    assert "\n" not in str(e.value) and "in peft format" in str(e.value)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("kinds,peft_rejects", [("gate", True), ("up", True), ("gate|down", True),
                                                ("up|down", True), ("gate|up", False)])
def test_mixtral_expert_subsets_that_are_refused_are_ones_peft_rejects_or_drops(tmp_path, monkeypatch, kinds,
                                                                                peft_rejects):
    """The refusal is needed: written anyway (the allowed expert sets widened to take it), peft either
    refuses to load the adapter, or (gate+up) loads it and computes the base model's logits, not lmzoo's."""
    peft = pytest.importorskip("peft")
    from lmzoo.peft import lora

    model = _mixtral_with_adapters(tmp_path, rf"experts\.\d+\.({kinds})")
    hf_short = {"gate": "w1", "up": "w3", "down": "w2"}
    monkeypatch.setattr(lora, "_EXPERT_SETS", (*lora._EXPERT_SETS, {hf_short[k] for k in kinds.split("|")}))
    _, hf, base_logits = _exported_to_hf(tmp_path, model)
    if peft_rejects:
        with pytest.raises(ValueError, match="fused into gate_up_proj"):
            peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    else:
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(_idx()).logits
        assert torch.equal(got, base_logits)  # loaded without error, and without effect
