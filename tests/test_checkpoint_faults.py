"""Faults in checkpoints, conversion and adapters: each bad input is one line naming the problem, never a
traceback or a silently wrong model; and what the formats cannot hold is refused, not written wrong.

1. HF config values of the wrong type / missing rope fields     5. to_hf of models HF cannot represent
2. non-floating tensors in HF weights                           6. multi-token heads over non-KV families
3. malformed ``lmzoo.quantization`` specs in a checkpoint       7. LoRA / QLoRA fine-tune checkpoints load
4. corrupt or incomplete LoRA adapters                          8. peft export of adapters peft applies wrongly
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.formats.hf import from_hf, to_hf
from lmzoo.models.mtp import MultiTokenLM
from lmzoo.peft.lora import apply_lora, export_peft, load_adapter, lora_modules, merge_lora, save_adapter
from lmzoo.peft.qlora import apply_qlora, quantize_model
from lmzoo.quant import bitnet
from lmzoo.tokenizer import ByteTokenizer


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, LmzooError)
    return msg


def _idx(vocab: int = 97, T: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(3))


def _logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx).logits


def _randomize_lora(model, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny HF directories written by lmzoo.to_hf (no transformers, no download), one per family."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, preset, kw in [("gpt2", "gpt2-debug", {"n_kv_head": 4}), ("llama", "llama-debug", {}),
                               ("mamba", "mamba-debug", {}), ("jamba", "jamba-debug", {})]:
        torch.manual_seed(0)
        out[family] = to_hf(lmzoo.build(preset, **kw), root / family)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- 1. HF config values --------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("llama", {"rope_parameters": None, "rope_scaling": {"rope_type": "linear"}}, r"rope_scaling\.factor is missing"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": "two"}},
     r"rope_scaling\.factor='two': expected a positive number"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": "x"}},
     r"rope_parameters\.original_max_position_embeddings='x'"),
    ("llama", {"rope_parameters": None, "rope_scaling": [1]}, r"rope_scaling=\[1\]: expected a mapping"),
    ("llama", {"hidden_size": "32"}, r"hidden_size='32': expected a positive integer"),
    ("llama", {"num_attention_heads": "4"}, r"num_attention_heads='4'"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": "abc"}}, r"rope_theta='abc'"),
    ("gpt2", {"n_embd": "32"}, r"n_embd='32': expected a positive integer"),
    ("gpt2", {"activation_function": ["gelu"]}, r"activation_function=\['gelu'\]: expected a string"),
    ("gpt2", {"tie_word_embeddings": "no"}, r"tie_word_embeddings='no': expected true or false"),
    ("mamba", {"time_step_rank": 2.5}, r"time_step_rank=2\.5: expected a positive integer or \"auto\""),
    ("mamba", {"expand": "2"}, r"expand='2'"),
    ("jamba", {"num_attention_heads": 0}, r"num_attention_heads=0: expected a positive integer"),
    ("jamba", {"num_experts": "4"}, r"num_experts='4': expected a non-negative integer"),
    ("jamba", {"mamba_dt_rank": "x"}, r"mamba_dt_rank='x'"),
]


@pytest.mark.parametrize("family,change,message", BAD_CONFIGS, ids=lambda v: str(v)[:40])
def test_bad_hf_config_value_is_one_line_naming_the_field(hf_dirs, tmp_path, family, change, message):
    d = _copy(hf_dirs[family], tmp_path / "hf")
    from_hf(d)  # the unedited copy loads
    _edit_json(d / "config.json", **change)
    with pytest.raises(CheckpointError, match=message) as e:
        from_hf(d)
    assert _one_line(e).startswith(str(d / "config.json"))


def test_bad_hf_config_through_the_cli_exits_2_without_traceback(hf_dirs, tmp_path, capsys):
    from lmzoo.cli.app import main

    d = _copy(hf_dirs["llama"], tmp_path / "hf")
    ByteTokenizer().save(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = {"rope_type": "linear"}
    (d / "config.json").write_text(json.dumps(cfg))
    code = main(["generate", "--checkpoint", str(d), "--prompt", "a", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmzoo:")]
    assert code == 2 and len(lines) == 1 and "rope_scaling.factor" in lines[0] and "Traceback" not in err


def test_linear_rope_with_a_factor_still_loads(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama"], tmp_path / "hf")
    _edit_json(d / "config.json", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    cfg = from_hf(d).config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta) == ("linear", 2.0, 500.0)


def test_integral_floats_for_integer_fields_load_as_integers(hf_dirs, tmp_path):
    """JSON writers may write 64 as 64.0 (transformers accepts it): read as the integer, anything else refused."""
    d = _copy(hf_dirs["llama"], tmp_path / "hf")
    want = _logits(from_hf(d), _idx())
    cfg = json.loads((d / "config.json").read_text())
    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32.0}
    _edit_json(d / "config.json", hidden_size=float(cfg["hidden_size"]),
               num_hidden_layers=float(cfg["num_hidden_layers"]), rope_parameters=yarn)
    model = from_hf(d)
    assert type(model.config.n_embd) is int and model.config.n_embd == cfg["hidden_size"]
    assert type(model.config.n_layer) is int and model.config.rope_scaling == "yarn"
    assert type(model.config.rope_original_max) is int and model.config.rope_original_max == 32
    assert _logits(model, _idx()).shape == want.shape
    _edit_json(d / "config.json", hidden_size=cfg["hidden_size"] + 0.5)
    with pytest.raises(CheckpointError, match=r"hidden_size=\d+\.5: expected a positive integer"):
        from_hf(d)


# -- 2. non-floating HF tensors -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("model.embed_tokens.weight", torch.int64), ("model.norm.weight", torch.int32),
                                        ("model.layers.0.self_attn.q_proj.weight", torch.bool)])
def test_non_floating_hf_tensor_is_refused_naming_it(hf_dirs, tmp_path, name, dtype):
    d = _copy(hf_dirs["llama"], tmp_path / "hf")
    st = load_file(d / "model.safetensors")
    st[name] = (st[name] * 100).to(dtype)  # q_proj is fused with k and v: a cast there would go unseen
    save_file(st, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{name}' has dtype {str(dtype)[6:]}.*floating point") as e:
        from_hf(d)
    _one_line(e)


def test_integer_mask_buffers_of_old_gpt2_files_are_still_ignored(hf_dirs, tmp_path):
    d = _copy(hf_dirs["gpt2"], tmp_path / "hf")
    st = load_file(d / "model.safetensors")
    st["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.uint8).tril()  # old checkpoints hold these
    save_file(st, d / "model.safetensors", metadata={"format": "pt"})
    ref = from_hf(hf_dirs["gpt2"])
    assert torch.equal(_logits(from_hf(d), _idx()), _logits(ref, _idx()))


# -- 3. the lmzoo.quantization spec of a checkpoint -------------------------------------------------------------

@pytest.fixture
def bitnet_ckpt(tmp_path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = bitnet.convert(lmzoo.build("gpt2-debug"))
    return lmzoo.save(model, tmp_path / "bit"), model


@pytest.mark.parametrize("spec,message", [
    ({"method": "bitnet"}, r"variant=None"),  # the bare method: replaces the whole spec
    ("bitnet", r"expected a mapping"),
    (["bitnet"], r"expected a mapping"),
    ({"modules": 5}, r"modules=5: expected a non-empty list"),
    ({"modules": ["*"]}, r"'\*' is not an nn\.Linear layer"),
    ({"modules": ["blocks.0.mixer_norm"]}, r"'blocks\.0\.mixer_norm' is not an nn\.Linear layer"),
    ({"variant": ["b1"]}, r"variant=\['b1'\]"),
    ({"norm": "yes"}, r"norm='yes': expected true or false"),
    ({"method": "gptq"}, r"unknown quantization method 'gptq'"),
])
def test_malformed_quantization_spec_is_one_line(bitnet_ckpt, spec, message):
    d, model = bitnet_ckpt
    assert torch.equal(_logits(lmzoo.load(d), _idx()), _logits(model, _idx()))  # intact, it loads exactly
    good = json.loads((d / "config.json").read_text())["lmzoo"]["quantization"]
    bad = {**good, **spec} if isinstance(spec, dict) and "method" not in spec else spec
    _edit_json(d / "config.json", lmzoo={"quantization": bad})
    with pytest.raises(CheckpointError, match=message) as e:
        lmzoo.load(d)
    assert "lmzoo.quantization" in _one_line(e)


# -- 4. LoRA adapters on their own ------------------------------------------------------------------------------

@pytest.fixture
def adapter(tmp_path) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    model = lmzoo.build("gpt2-debug")
    apply_lora(model, target="mixer.qkv|ffn.fc", r=2)
    _randomize_lora(model)
    return save_adapter(model, tmp_path / "ad"), _logits(model, _idx())


def _fresh():
    torch.manual_seed(0)
    return lmzoo.build("gpt2-debug")


def _drop(key_part: str):
    def edit(d: Path) -> None:
        st = load_file(d / "adapter.safetensors")
        save_file({k: v for k, v in st.items() if key_part not in k}, d / "adapter.safetensors")
    return edit


def _set_lora(**changes):
    def edit(d: Path) -> None:
        meta = json.loads((d / "adapter.json").read_text())
        meta["lora"].update(changes)
        (d / "adapter.json").write_text(json.dumps(meta))
    return edit


def _int_tensor(d: Path) -> None:
    st = load_file(d / "adapter.safetensors")
    st["blocks.0.mixer.qkv.lora_A"] = st["blocks.0.mixer.qkv.lora_A"].long()
    save_file(st, d / "adapter.safetensors")


ADAPTER_FAULTS = {
    "json garbage": (lambda d: (d / "adapter.json").write_text("{not json"), r"adapter\.json: not valid JSON"),
    "json list": (lambda d: (d / "adapter.json").write_text("[1]"), r"adapter\.json: expected a JSON object"),
    "truncated weights": (lambda d: open(d / "adapter.safetensors", "r+b").truncate(60), r"unreadable or truncated"),
    "no weights": (lambda d: (d / "adapter.safetensors").unlink(), r"adapter\.safetensors is missing"),
    "all lora_B missing": (_drop("lora_B"), r"missing adapter tensor\(s\) blocks\.0\.mixer\.qkv\.lora_B"),
    "one lora_A missing": (_drop("blocks.1.ffn.fc.lora_A"), r"missing adapter tensor\(s\) blocks\.1\.ffn\.fc\.lora_A"),
    "r a string": (_set_lora(r="x"), r"lora: r='x': expected a positive integer"),
    "r mismatch": (_set_lora(r=3), r"'blocks\.0\.(mixer\.qkv|ffn\.fc)\.lora_A' has shape \(2, 32\).*\(3, 32\)"),
    "modules not a list": (_set_lora(modules="blocks.0.mixer.qkv"), r"modules='blocks\.0\.mixer\.qkv'"),
    "unknown module": (_set_lora(modules=["blocks.9.mixer.qkv"]), r"'blocks\.9\.mixer\.qkv' does not exist"),
    "integer tensor": (_int_tensor, r"'blocks\.0\.mixer\.qkv\.lora_A' has dtype torch\.int64"),
}


@pytest.mark.parametrize("fault", list(ADAPTER_FAULTS))
def test_bad_adapter_is_one_line_and_leaves_the_model_untouched(adapter, fault):
    d, want = adapter
    assert torch.equal(_logits(load_adapter(_fresh(), d), _idx()), want)  # the intact adapter loads exactly
    edit, message = ADAPTER_FAULTS[fault]
    edit(d)
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as e:
        load_adapter(model, d)
    _one_line(e)
    assert not getattr(model, "lora", None) and not list(lora_modules(model))  # nothing half-injected
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_adapter_with_another_alpha_is_refused_by_a_model_with_adapters(adapter):
    """Loading into existing LoRA layers keeps their scaling: a different alpha would give wrong logits."""
    d, want = adapter
    same = _fresh()
    apply_lora(same, target="mixer.qkv|ffn.fc", r=2)
    assert torch.equal(_logits(load_adapter(same, d), _idx()), want)  # same r and alpha: the saved model
    other = _fresh()
    apply_lora(other, target="mixer.qkv|ffn.fc", r=2, alpha=other_alpha(d))
    with pytest.raises(CheckpointError, match=r"alpha") as e:
        load_adapter(other, d)
    _one_line(e)


def other_alpha(d: Path) -> float:
    return 2 * json.loads((d / "adapter.json").read_text())["lora"]["alpha"] + 1


# -- 5. to_hf of what HF cannot represent -------------------------------------------------------------------------

def _lora(preset="llama-debug", merged=False, unwrap=False, **kw):
    m = lmzoo.build(preset, **kw)
    apply_lora(m, target="mixer.qkv", r=2)
    _randomize_lora(m)
    return merge_lora(m, unwrap=unwrap) if merged else m


def _qlora():
    m = lmzoo.build("llama-debug")
    apply_qlora(m, target="mixer.qkv", r=2, compute_dtype=torch.float32)
    return m


UNEXPORTABLE = {
    "gpt2 linear attention": (lambda: lmzoo.build("gpt2-debug", n_kv_head=4, attention="linear"), "attention='linear'"),
    "gpt2 infini attention": (lambda: lmzoo.build("gpt2-debug", n_kv_head=4, attention="infini", infini_segment=4),
                              "attention='infini'"),
    "gpt2 kv sharing": (lambda: lmzoo.build("gpt2-debug", n_kv_head=4, kv_share_every=2), "kv_share_every=2"),
    "gpt2 moe": (lambda: lmzoo.build("gpt2-debug", n_kv_head=4, n_experts=2), "n_experts=2"),
    "llama infini": (lambda: lmzoo.build("llama-debug", attention="infini", infini_segment=4), "attention='infini'"),
    "multi-token heads": (lambda: MultiTokenLM(lmzoo.build("llama-debug"), 2), "multi-token prediction heads"),
    "bitnet": (lambda: bitnet.convert(lmzoo.build("llama-debug")), "BitNet"),
    "bitnet without norm": (lambda: bitnet.convert(lmzoo.build("llama-debug"), norm=False), "BitNet"),
    "bitnet packed": (lambda: bitnet.pack(bitnet.convert(lmzoo.build("llama-debug"))), "BitNet"),
    "lora": (_lora, "LoRA adapters"),
    "lora merged, not unwrapped": (lambda: _lora(merged=True), "LoRA adapters"),
    "qlora": (_qlora, "NF4-quantized layers"),
}


@pytest.mark.parametrize("case", list(UNEXPORTABLE))
def test_to_hf_refuses_what_hf_cannot_represent(tmp_path, case):
    make, feature = UNEXPORTABLE[case]
    with pytest.raises(ConfigError, match=feature) as e:
        to_hf(make(), tmp_path / "out")
    _one_line(e)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unwrapped_merged_lora_still_exports_with_the_adapted_logits(tmp_path):
    m = _lora()
    want = _logits(m, _idx())
    merge_lora(m, unwrap=True)
    back = from_hf(to_hf(m, tmp_path / "out"))
    torch.testing.assert_close(_logits(back, _idx()), want, atol=1e-5, rtol=0)


# -- 6. multi-token heads need a KV-cache Transformer -------------------------------------------------------------

@pytest.mark.parametrize("preset,kw,message", [
    ("mamba-debug", {}, "MambaCache"),
    ("jamba-debug", {"n_experts": 0}, "HybridCache"),
    ("transformer-xl-debug", {}, "XLMemory"),
    ("gpt2-debug", {"n_kv_head": 4, "attention": "linear"}, "LinearAttentionState"),
    ("gpt2-debug", {"n_kv_head": 4, "kv_share_every": 2}, "kv_share_every=2"),
])
def test_multi_token_heads_refuse_models_without_a_kv_cache(preset, kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        MultiTokenLM(lmzoo.build(preset, **kw), n_future=2)
    assert "multi-token prediction" in _one_line(e)
    from lmzoo.models import PRESETS, preset_config
    from lmzoo.train.variants import check_variants

    with pytest.raises(ConfigError, match=message):  # before any data is prepared, given the model
        check_variants(2, "off", {}, PRESETS[preset][0], preset_config(preset, **kw))
    check_variants(1, "off", {}, PRESETS[preset][0], preset_config(preset, **kw))  # one head: nothing to refuse


def test_multi_token_training_run_over_mamba_is_refused_before_training(prepare_text, tmp_path):
    from lmzoo.train import TrainConfig, Trainer

    data = prepare_text("the quick brown fox jumps over the lazy dog.\n" * 50)
    cfg = TrainConfig.from_dict(dict(model="mamba-debug", multi_token=2, data_dir=str(data),
                                     out_dir=str(tmp_path / "r"), batch_size=2, block_size=16, max_steps=2,
                                     device="cpu", progress=False, sample_tokens=0))
    with pytest.raises(ConfigError, match="full KV cache"):
        Trainer(cfg)
    assert not list((tmp_path / "r").glob("ckpt-*"))


# -- 7. LoRA / QLoRA fine-tune checkpoints load -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_checkpoint_loads_as_the_finetuned_model(tmp_path, method):
    from lmzoo.peft.finetune import finetune

    torch.manual_seed(0)
    lmzoo.save(lmzoo.build("gpt2-debug", vocab_size=257), tmp_path / "base", ByteTokenizer())
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    s = finetune(tmp_path / "base", method=method, target="mixer.qkv|ffn.fc", r=2, source=str(tmp_path / "t.txt"),
                 tokenizer="byte", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), max_steps=3,
                 batch_size=4, block_size=32, eval_interval=2, eval_iters=1, warmup_steps=0, lr=1e-2,
                 sample_tokens=0, progress=False, device="cpu")
    assert s["step"] == 3
    loaded = lmzoo.load(tmp_path / "run")  # the newest checkpoint, written at the last step
    settings = json.loads((lmzoo.formats.checkpoint.resolve(tmp_path / "run") / "config.json").read_text())["lmzoo"]
    assert settings["lora"]["r"] == 2 and ("nf4" in settings) == (method == "qlora")
    # the in-memory fine-tuned model, rebuilt independently: base (+ the same NF4 quantization) + the adapter
    ref = lmzoo.load(tmp_path / "base")
    if method == "qlora":
        quantize_model(ref, compute_dtype=torch.float32)
    load_adapter(ref, s["adapter_dir"])
    assert any(m.lora_B.abs().sum() > 0 for _, m in lora_modules(loaded))  # it did train
    idx = _idx(257)
    assert torch.equal(_logits(loaded, idx), _logits(ref, idx))
    assert not torch.allclose(_logits(loaded, idx), _logits(lmzoo.load(tmp_path / "base"), idx))
    # `lmzoo generate` has what it needs
    assert lmzoo.formats.checkpoint.load_tokenizer_of(tmp_path / "run") is not None


def test_saved_merged_lora_is_not_applied_twice(tmp_path):
    m = _lora("gpt2-debug", merged=True)
    want = _logits(m, _idx())
    back = lmzoo.load(lmzoo.save(m, tmp_path / "ck"))
    assert all(x.merged for _, x in lora_modules(back))
    assert torch.equal(_logits(back, _idx()), want)


@pytest.mark.parametrize("key,value,message", [
    ("lora", {"r": 2, "alpha": 4}, r"lmzoo\.lora: modules=None"),
    ("lora", {"r": 2, "modules": ["blocks.0.mixer.qkv"]}, r"lmzoo\.lora: alpha=None"),
    ("lora", {"r": 0, "alpha": 4, "modules": ["blocks.0.mixer.qkv"]}, r"lmzoo\.lora: r=0"),
    ("lora", {"r": 2, "alpha": 4, "modules": ["blocks.0.nope"]}, r"lmzoo\.lora: .*'blocks\.0\.nope' does not exist"),
    ("nf4", {"method": "nf4", "modules": ["head", "head"]}, r"lmzoo\.nf4: modules: a module is named twice"),
    ("nf4", {"method": "nf4", "modules": ["blocks.0.mixer.qkv"], "compute_dtype": "int8"}, r"compute_dtype='int8'"),
])
def test_malformed_peft_settings_are_one_line(tmp_path, key, value, message):
    d = lmzoo.save(lmzoo.build("gpt2-debug"), tmp_path / "ck")
    _edit_json(d / "config.json", lmzoo={key: value})
    with pytest.raises(CheckpointError, match=message) as e:
        lmzoo.load(d)
    _one_line(e)


# -- 8. peft export of Mamba / Jamba ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,target,module", [
    ("mamba-debug", r"mixer\.dt_proj", "blocks.0.mixer.dt_proj"),
    ("mamba-debug", "mixer", "blocks.0.mixer"),  # every mixer projection: dt_proj and out_proj among them
    ("jamba-debug", r"mixer\.dt_proj", "blocks.0.mixer.dt_proj"),
    ("jamba-debug", r"ffn\.experts", "blocks.0.ffn.experts.0"),
])
def test_export_peft_refuses_adapters_peft_would_apply_wrongly(tmp_path, preset, target, module):
    m = lmzoo.build(preset)
    apply_lora(m, target=target, r=2)
    with pytest.raises(ConfigError, match=rf"'{module}.*in peft format") as e:
        export_peft(m, tmp_path / "ad")
    _one_line(e)
    assert not (tmp_path / "ad").exists()


def test_export_peft_refuses_a_base_to_hf_cannot_write(tmp_path):
    m = MultiTokenLM(lmzoo.build("llama-debug"), 2)
    apply_lora(m, target="mixer.qkv", r=2)
    with pytest.raises(ConfigError, match="multi-token prediction heads"):
        export_peft(m, tmp_path / "ad")


@pytest.mark.parametrize("preset,target", [("mamba-debug", r"mixer\.(in_proj|x_proj)"),
                                           ("jamba-debug", r"mixer\.(qkv|in_proj|x_proj|out_proj)|ffn\.(gate|up)")])
def test_export_peft_of_the_allowed_mamba_and_jamba_layers_matches_peft(tmp_path, preset, target):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = lmzoo.build(preset)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(std=0.2)
    to_hf(m, tmp_path / "base")
    apply_lora(m, target=target, r=2, alpha=4)
    _randomize_lora(m, 0.5)
    want = _logits(m, _idx())
    export_peft(m, tmp_path / "ad")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    base_logits = _logits(hf, _idx())
    got = _logits(peft.PeftModel.from_pretrained(hf, tmp_path / "ad"), _idx())
    assert (base_logits - want).abs().max() > 1e-3  # the adapters change the output
    assert (got - want).abs().max() <= 1e-4


def test_quantized_layers_count_the_weights_they_hold(tmp_path, capsys):
    """NF4 and packed BitNet keep their weights in buffers: num_params (and so FLOPs and `lmzoo info`) still
    counts them, plus only what LoRA adds."""
    from lmzoo.cli.app import main

    base = lmzoo.build("llama-debug")
    n = base.num_params()
    q = _qlora()
    lora = sum(p.numel() for name, p in q.named_parameters() if "lora_" in name)
    assert lora > 0 and q.num_params() == n + lora
    ternary = bitnet.convert(lmzoo.build("llama-debug"), "b1.58")  # adds its sub-layer norms' weights
    n_ternary, flops_ternary = ternary.num_params(), ternary.flops_per_token()
    assert bitnet.pack(ternary).num_params() == n_ternary and ternary.flops_per_token() == flops_ternary
    assert main(["info", "--checkpoint", str(lmzoo.save(q, tmp_path / "q"))]) == 0
    assert f"parameters           {n + lora:,}" in capsys.readouterr().out
