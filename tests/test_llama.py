"""The Llama family against transformers (Llama 2, Mistral, Mixtral), the rolling cache, and bad input.

Every HF model is a tiny random one built here and saved with ``save_pretrained``; it is loaded
through the real converter (``lmzoo.from_hf``). Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lmzoo
from lmzoo.cache import KVCache, RollingKVCache
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats.hf.llama import meta_to_rotate_half
from lmzoo.layers.rope import apply_rope, rope_frequencies, scaled_rope_frequencies

transformers = pytest.importorskip("transformers")

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB, hidden_size=40, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no stop token: 32 tokens every time
)
# (HF config class, HF model class, settings): GQA 5:1, 1:1 with an odd count, 2:1, and a head_dim apart
CASES = {
    "llama-gqa5-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=5, num_key_value_heads=1, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 500.0})),
    "llama-yarn-tied-headdim": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0})),
    "mistral-window6-mha5": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=5, num_key_value_heads=5, sliding_window=6)),
    "mixtral-4experts-top2": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=None)),
    "mixtral-window5-8experts": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_attention_heads=5, num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=5)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy machine (no spinning workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_model(case: str, **extra):
    cfg_cls, model_cls, settings = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **settings, **extra})
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each case saved once with save_pretrained (the Mixtral ones sharded, to load shard by shard)."""
    out = {}
    for case in CASES:
        d = tmp_path_factory.mktemp(case)
        shard = "40KB" if case.startswith("mixtral") else "5GB"
        hf_model(case).save_pretrained(d, max_shard_size=shard)
        out[case] = d
    return out


def hf_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(x).logits


@pytest.mark.parametrize("case", list(CASES))
def test_logits_greedy_continuation_and_round_trip_match_transformers(case, saved, tmp_path):
    path = saved[case]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = lmzoo.from_hf(path)
    assert model.family == "llama"
    x = torch.randint(0, VOCAB, (2, 40))  # longer than every sliding window here
    with torch.no_grad():
        ref = hf(x).logits
    assert (model(x).logits - ref).abs().max().item() <= 1e-4

    prompts = x[:, :7]
    ours = lmzoo.generate(model, prompts.tolist(), 32, temperature=0.0)
    theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, do_sample=False)
    assert ours == theirs[:, 7:].tolist()

    lmzoo.to_hf(model, tmp_path / "export")
    assert (hf_logits(tmp_path / "export", x) - ref).abs().max().item() <= 1e-4


def test_config_maps_the_architecture_fields(saved):
    mistral = lmzoo.from_hf(saved["mistral-window6-mha5"]).config
    assert (mistral.sliding_window, mistral.n_head, mistral.n_kv_head, mistral.n_experts) == (6, 5, 5, 0)
    mixtral = lmzoo.from_hf(saved["mixtral-window5-8experts"]).config
    assert (mixtral.n_experts, mixtral.n_experts_per_tok, mixtral.sliding_window) == (8, 2, 5)
    assert mixtral.n_kv_head == 1
    llama = lmzoo.from_hf(saved["llama-yarn-tied-headdim"]).config
    assert (llama.rope_scaling, llama.rope_factor, llama.rope_original_max) == ("yarn", 4.0, 16)
    assert llama.head_dim == 6
    assert llama.tie_embeddings


def test_sharded_checkpoint_is_read_through_its_index(saved):
    index = json.loads((saved["mixtral-4experts-top2"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in index["weight_map"])  # classic layout


def test_transformers5_fused_expert_layout_loads(saved, tmp_path):
    """transformers 5 holds experts as gate_up_proj (E, 2I, C) / down_proj (E, C, I): read that too."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved["mixtral-4experts-top2"]).eval()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    d = tmp_path / "fused"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text((saved["mixtral-4experts-top2"] / "config.json").read_text())
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (lmzoo.from_hf(d)(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_loads_directly_in_bfloat16(saved):
    m = lmzoo.from_hf(saved["mixtral-4experts-top2"], dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    ref = lmzoo.from_hf(saved["mixtral-4experts-top2"])
    x = torch.randint(0, VOCAB, (1, 16))
    got, want = m(x).logits.float(), ref(x).logits
    assert (got - want).abs().max() < 0.1 * want.abs().max() + 0.05


# --- bad input -------------------------------------------------------------------------------------


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match=r"unsupported architecture.*llama.*mistral.*mixtral"):
        lmzoo.from_hf(tmp_path)


def test_unsupported_rope_type_is_refused(saved, tmp_path):
    d = tmp_path / "llama3"
    d.mkdir()
    cfg = json.loads((saved["mistral-window6-mha5"] / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope type 'llama3'.*supported: default, linear, yarn"):
        lmzoo.from_hf(d)


def test_mismatched_shape_names_the_tensor(saved, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    src = saved["llama-gqa5-linear-rope"]
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 50  # the file's MLP is 48 wide
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight.*shape"):
        lmzoo.from_hf(d)
    cfg["intermediate_size"], cfg["num_key_value_heads"] = 48, 5  # GQA 5:1 in the file, 1:1 in the config
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.[kv]_proj\.weight.*\(8, 40\)"):
        lmzoo.from_hf(d)


def test_missing_shard_names_the_file(saved, tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    for f in saved["mixtral-4experts-top2"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        lmzoo.from_hf(d)


def test_export_refuses_what_transformers_cannot_express(tmp_path):
    m = lmzoo.build("mistral-debug", window_pattern="LG")
    with pytest.raises(ConfigError, match="window_pattern"):
        lmzoo.to_hf(m, tmp_path / "x")


# --- RoPE ------------------------------------------------------------------------------------------


def test_meta_interleaved_rope_equals_rotate_half_after_the_permutation():
    torch.manual_seed(0)
    n_heads, hd, C, T = 3, 8, 24, 5
    w = torch.randn(n_heads * hd, C)
    x = torch.randn(T, C)
    angles = torch.arange(T)[:, None].float() * rope_frequencies(hd)[None]  # (T, hd/2)
    # Meta: rotate adjacent pairs (2j, 2j+1) as complex numbers
    q = (x @ w.T).view(T, n_heads, hd // 2, 2)
    q = torch.view_as_real(torch.view_as_complex(q) * torch.polar(torch.ones_like(angles), angles)[:, None])
    meta = q.reshape(T, n_heads, hd)
    # lmzoo / HF: rotate half with the permuted weights
    emb = torch.cat([angles, angles], -1)
    q2 = (x @ meta_to_rotate_half(w, n_heads).T).view(T, n_heads, hd).transpose(0, 1)  # (nh, T, hd)
    ours = apply_rope(q2, emb.cos(), emb.sin()).transpose(0, 1)
    # the same scores: dot products are invariant to the channel permutation inside a head
    scores = lambda t: t @ t.transpose(-1, -2)
    torch.testing.assert_close(scores(ours), scores(meta), atol=1e-4, rtol=1e-4)


def test_ntk_scaling_interpolates_the_lowest_frequency_by_the_factor():
    base, ntk = rope_frequencies(64, 10000.0), scaled_rope_frequencies(64, 10000.0, "ntk", 4.0)
    assert ntk[0] == base[0]  # the fastest rotation is kept
    assert math.isclose(ntk[-1].item(), base[-1].item() / 4.0, rel_tol=1e-4)  # the slowest is interpolated


def test_presets_have_the_published_parameter_counts():
    counts = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
              "mistral-7b": 7_241_732_096, "mixtral-8x7b": 46_702_792_704}
    for preset, n in counts.items():
        with torch.device("meta"):
            assert lmzoo.build(preset).num_params() == n, preset
    with torch.device("meta"):
        assert 12.8e9 < lmzoo.build("mixtral-8x7b").active_params() < 13.0e9  # "13B active parameters"


# --- sliding window and the rolling cache ----------------------------------------------------------


def test_rolling_cache_decodes_past_the_window_exactly_with_constant_memory():
    torch.manual_seed(0)
    m = lmzoo.build("mistral-debug", block_size=128).eval()  # window 8
    x = torch.randint(0, 97, (2, 50))
    full = m(x).logits
    cache = m.init_cache(2, 10_000)  # any length: the ring is the window, not max_len
    assert isinstance(cache, RollingKVCache)
    size, ptrs = cache.nbytes, [t.data_ptr() for t in cache.k]
    assert all(t.shape[2] == 8 for t in (*cache.k, *cache.v))
    steps = []
    for t in range(50):
        steps.append(m(x[:, t : t + 1], cache=cache).logits)
        assert cache.nbytes == size and [t.data_ptr() for t in cache.k] == ptrs  # never reallocated
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    # prefill chunks longer than the window, then shorter ones, then single tokens
    cache = m.init_cache(2, 50)
    bounds = [0, 19, 22, 35, 36, 50]
    parts = [m(x[:, a:b], cache=cache).logits for a, b in zip(bounds, bounds[1:])]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4
    assert cache.nbytes == size


def test_rolling_and_full_caches_agree_on_a_local_global_pattern():
    torch.manual_seed(0)
    m = lmzoo.build("mistral-debug", n_layer=4, sliding_window=4, window_pattern="LLG").eval()
    assert m.windows == [4, 4, None, 4]
    x = torch.randint(0, 97, (1, 30))
    full = m(x).logits
    rolling, plain = m.init_cache(1, 30), m.init_cache(1, 30, rollback=True)
    assert isinstance(plain, KVCache) and [t.shape[2] for t in rolling.k] == [4, 4, 30, 4]
    for cache in (rolling, plain):
        got = torch.cat([m(x[:, :9], cache=cache).logits] + [m(x[:, t : t + 1], cache=cache).logits
                                                              for t in range(9, 30)], 1)
        assert (got - full).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="full"):  # the global layer still needs every key
        m(x[:, :1], cache=rolling)


def test_window_changes_the_output_only_beyond_the_window():
    torch.manual_seed(0)
    local = lmzoo.build("mistral-debug").eval()  # window 8
    full = lmzoo.build("llama-debug").eval()
    full.load_state_dict(local.state_dict())
    x = torch.randint(0, 97, (1, 20))
    a, b = local(x).logits, full(x).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4
    assert local.flops_per_token(4096) < full.flops_per_token(4096)  # attention cost capped by the window
