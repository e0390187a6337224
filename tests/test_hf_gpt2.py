"""Acceptance tests of the Hugging Face GPT-2 converter against the real ``transformers`` model.

Every model here is a tiny random one built in the test and saved to tmp_path: nothing is
downloaded.
"""

from __future__ import annotations

import gc
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from lmzoo.decoding.generate import generate  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError  # noqa: E402
from lmzoo.formats.hf import from_hf, materialize_buffers, to_hf  # noqa: E402
from lmzoo.models.gpt2 import GPT, GPTConfig  # noqa: E402

VOCAB, CTX = 1000, 128
SMALL = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=CTX)
HF_CONFIGS = {
    "4-heads-gelu_new": dict(SMALL),
    "3-heads-gelu-n_inner": dict(SMALL, n_head=3, n_embd=48, activation_function="gelu", n_inner=100),
    "untied-head": dict(SMALL, tie_word_embeddings=False, layer_norm_epsilon=1e-6),
}


def make_hf(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A random float32 GPT2LMHeadModel in eval mode, with no eos so generate never stops early."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**SMALL, **overrides}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def ids(seed: int = 1, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def hf_state(hf: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in hf.state_dict().items()}


def save_hf_weights(path, hf: GPT2LMHeadModel, state: dict[str, torch.Tensor]) -> None:
    """config.json via transformers and a hand-made model.safetensors (for corrupted variants)."""
    path.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def assert_same_logits(hf: GPT2LMHeadModel, model, atol: float = 1e-4) -> None:
    x = ids()
    ref = hf(x).logits
    out = model(x).logits
    assert out.shape == ref.shape
    assert (out.float() - ref.float()).abs().max().item() <= atol


@torch.no_grad()
def hf_greedy(hf: GPT2LMHeadModel, prompts: torch.Tensor, n: int) -> list[list[int]]:
    out = hf.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=n, pad_token_id=0
    )
    assert out.shape[1] == prompts.shape[1] + n  # HF did not stop early
    return out[:, prompts.shape[1] :].tolist()


def assert_fully_loaded(model) -> None:
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        assert not t.is_meta, name
    if model.config.tie_embeddings:
        assert model.head.weight is model.embed.weight
    else:
        assert model.head.weight is not model.embed.weight


# -- 1. safetensors: logits and greedy decoding ------------------------------------------------


@pytest.mark.parametrize("variant", list(HF_CONFIGS))
def test_from_hf_safetensors_matches_transformers_logits_and_greedy_decoding(tmp_path, variant):
    hf = make_hf(**HF_CONFIGS[variant])
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = from_hf(tmp_path)
    assert_fully_loaded(model)
    assert not model.training
    assert_same_logits(hf, model)
    prompts = ids(seed=2, shape=(2, 8))
    assert generate(model, prompts.tolist(), max_new_tokens=32, temperature=0.0) == hf_greedy(hf, prompts, 32)


def test_from_hf_builds_on_meta_so_no_weight_is_initialized(tmp_path, monkeypatch):
    make_hf().save_pretrained(tmp_path)
    devices = []
    original = GPT.init_weights

    def spy(self):
        devices.append(self.embed.weight.device.type)
        original(self)

    monkeypatch.setattr(GPT, "init_weights", spy)
    from_hf(tmp_path)
    assert devices == ["meta"]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_loaded_model_owns_its_memory_and_leaves_the_file_unmapped(tmp_path, layout):
    hf = make_hf()
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        torch.save(hf_state(hf), tmp_path / "pytorch_model.bin")
    model = from_hf(tmp_path)
    gc.collect()
    with open("/proc/self/maps") as f:
        assert str(tmp_path) not in f.read()  # a truncated file can no longer fault the model
    assert_same_logits(hf, model)


def test_from_hf_casts_to_the_requested_dtype(tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, "bfloat16"):
        model = from_hf(tmp_path, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert_same_logits(hf, model, atol=0.05)
    with pytest.raises(ConfigError, match="int8"):
        from_hf(tmp_path, dtype="int8")


def test_meta_built_rope_model_gets_the_buffers_of_a_normal_build():
    cfg = GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, block_size=40, vocab_size=50, pos_emb="rope")
    ref = GPT(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    materialize_buffers(model, "cpu")
    assert model.rope.cos.shape == (40, 8)
    for name in ("inv_freq", "cos", "sin"):
        assert torch.equal(getattr(model.rope, name), getattr(ref.rope, name)), name


# -- 2. pytorch_model.bin (weights_only) -----------------------------------------------------


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_from_hf_reads_pytorch_model_bin_with_weights_only(tmp_path, monkeypatch, prefix):
    # transformers 5 only writes safetensors; write the .bin as older versions did: the state dict
    # including the tied lm_head and the causal-mask buffers (the original gpt2 upload has no prefix).
    hf = make_hf()
    hf.config.save_pretrained(tmp_path)
    state = {}
    for k, v in hf_state(hf).items():
        state[k if k == "lm_head.weight" else prefix + k.removeprefix("transformer.")] = v
    for i in range(hf.config.n_layer):
        state[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, CTX, CTX).tril()
        state[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    model = from_hf(tmp_path)
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    assert_fully_loaded(model)
    assert_same_logits(hf, model)
    prompts = ids(seed=3, shape=(1, 8))
    assert generate(model, prompts, max_new_tokens=32, temperature=0.0) == hf_greedy(hf, prompts, 32)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle is executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_pytorch_model_bin_is_refused_and_never_runs(tmp_path):
    hf = make_hf()
    hf.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    state = hf_state(hf)
    state["transformer.wte.weight"] = _Payload(str(marker))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        from_hf(tmp_path)
    assert not marker.exists()
    # the payload is live: a plain unpickle would have created the file
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(str(live)))).close()
    assert live.exists()


# -- 3. to_hf -> transformers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [dict(mlp="gelu_tanh"), dict(mlp="gelu", tie_embeddings=False, mlp_hidden=96, n_head=3, n_embd=48)],
    ids=["tied-gelu_tanh", "untied-gelu-odd-heads"],
)
def test_to_hf_output_loads_in_transformers_with_the_same_logits(tmp_path, overrides):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=4, n_embd=64), **overrides})
    model = GPT(cfg).eval()
    with torch.no_grad():  # biases and norms away from 0 and 1, so a swapped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = to_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert_same_logits(hf, model)
    # and back again: the round trip is exact
    back = from_hf(out)
    assert back.config.to_dict() == {**model.config.to_dict()}
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_to_hf_writes_the_requested_dtype_and_keeps_other_files(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=4, n_embd=64))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    to_hf(model, out, dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once, as wte
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("pos_emb", dict(pos_emb="rope")),
        ("norm", dict(norm="rmsnorm")),
        ("mlp", dict(mlp="swiglu")),
        ("bias", dict(bias=False)),
        ("n_kv_head", dict(n_kv_head=2)),
    ],
)
def test_to_hf_refuses_models_gpt2_cannot_express_naming_the_field(tmp_path, field, overrides):
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=4, n_embd=32, **overrides))
    with pytest.raises(ConfigError, match=f"{field}="):
        to_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# -- 4. sharded checkpoints ------------------------------------------------------------------


def test_sharded_safetensors_load_and_a_missing_shard_is_named(tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_logits(hf, from_hf(tmp_path))
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=shards[-1]):
        from_hf(tmp_path)


def test_sharded_pytorch_model_bin_loads(tmp_path):
    hf = make_hf()
    hf.config.save_pretrained(tmp_path)
    state = hf_state(hf)
    names = list(state)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        shard = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_logits(hf, from_hf(tmp_path))


# -- 5. bad input ----------------------------------------------------------------------------


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match=r"'bert'.*supported model types: .*gpt2"):
        from_hf(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_hf(tmp_path)
    make_hf().config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(tmp_path)


@pytest.mark.parametrize("keep", [4, 100, 0.5, -8], ids=["header-length", "mid-header", "half", "last-bytes"])
def test_truncated_safetensors_is_a_checkpoint_error(tmp_path, keep):
    make_hf().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) + keep)
    f.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    "key, shape, shown",
    [
        ("transformer.wpe.weight", (100, 64), r"\(100, 64\), expected \(128, 64\)"),
        ("transformer.h.1.attn.c_attn.weight", (192, 64), r"\(192, 64\), expected \(64, 192\).*\(in, out\)"),
    ],
)
def test_a_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, key, shape, shown):
    hf = make_hf()
    state = hf_state(hf)
    state[key] = torch.zeros(shape)
    save_hf_weights(tmp_path, hf, state)
    with pytest.raises(CheckpointError, match=f"{key}.*{shown}"):
        from_hf(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    hf = make_hf()
    state = hf_state(hf)
    del state["transformer.ln_f.bias"]
    save_hf_weights(tmp_path / "missing", hf, state)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) transformer\.ln_f\.bias"):
        from_hf(tmp_path / "missing")
    for extra in ("transformer.h.0.attn.rotary.weight", "transformer.h.2.ln_1.weight", "score.weight"):
        state = {**hf_state(hf), extra: torch.zeros(64)}
        save_hf_weights(tmp_path / "extra", hf, state)
        with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}'"):
            from_hf(tmp_path / "extra")


@pytest.mark.parametrize(
    "setting",
    [
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(reorder_and_upcast_attn=True),
        dict(scale_attn_weights=False),
        dict(activation_function="relu"),
    ],
    ids=lambda s: next(iter(s)),
)
def test_configs_lmzoo_cannot_compute_exactly_are_refused(tmp_path, setting):
    make_hf(**setting).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=next(iter(setting))):
        from_hf(tmp_path)


def test_an_invalid_config_value_is_a_checkpoint_error(tmp_path):
    make_hf().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_head": 5}))  # 64 % 5 != 0
    with pytest.raises(CheckpointError, match="n_embd.*n_head"):
        from_hf(tmp_path)
