"""Jamba: the layer pattern, the hybrid cache (KV + SSM state), Jamba's router, and transformers parity.

The HF model is a tiny random ``JambaForCausalLM`` built and saved here with every combination of
mixer and feed-forward part, loaded through the real converter. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import lmzoo
from lmzoo.cache import HybridCache
from lmzoo.decoding.generate import left_pad
from lmzoo.errors import ConfigError
from lmzoo.layers.moe import MoE
from lmzoo.models.jamba import JambaConfig
from lmzoo.train.activation_checkpointing import apply_activation_checkpointing

VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_layer_pattern_places_attention_and_experts_like_the_paper():
    cfg = JambaConfig()  # Jamba v0.1
    assert [i for i in range(32) if cfg.is_attention(i)] == [4, 12, 20, 28]  # a:m = 1:7
    assert [i for i in range(32) if cfg.is_moe(i)] == list(range(1, 32, 2))  # every other layer
    with pytest.raises(ConfigError, match="attn_offset"):
        JambaConfig(attn_every=4, attn_offset=4)
    with pytest.raises(ConfigError, match="moe_offset"):
        JambaConfig(moe_every=2, moe_offset=2)


def test_jamba_v01_has_the_released_parameter_count():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ours = lmzoo.build("jamba-v0.1")
        hf = transformers.JambaForCausalLM(transformers.JambaConfig())
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == 51_570_323_328  # "52B"
    assert 12.0e9 < ours.active_params() < 12.2e9  # "12B active parameters"


def test_hybrid_cache_keeps_keys_only_for_the_attention_layers():
    m = lmzoo.build("jamba-debug")  # layers: mamba, attention, mamba, attention
    cache = m.init_cache(2, 100)
    assert isinstance(cache, HybridCache)
    assert cache.kv.k.shape[0] == 2 and cache.ssm.ssm.shape[0] == 2
    longer = m.init_cache(2, 1000)
    # only the KV part grows with the context; the SSM state is the same size at any length
    assert longer.ssm.nbytes == cache.ssm.nbytes and longer.kv.nbytes == 10 * cache.kv.nbytes


def test_recurrent_decoding_equals_the_full_forward_at_every_position():
    torch.manual_seed(0)
    m = lmzoo.build("jamba-debug").eval()
    x = torch.randint(0, VOCAB, (2, 41))
    with torch.no_grad():
        full = m(x).logits
        cache = m.init_cache(2, 41)
        steps = torch.cat([m(x[:, t : t + 1], cache=cache).logits for t in range(41)], 1)
        cache = m.init_cache(2, 41)  # chunked prefills (parallel scan from the cached state), then steps
        parts = [m(x[:, :19], cache=cache).logits, m(x[:, 19:30], cache=cache).logits]
        parts += [m(x[:, t : t + 1], cache=cache).logits for t in range(30, 41)]
    assert (steps - full).abs().max() <= 1e-4
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


def test_left_padded_batch_decodes_each_row_as_alone():
    torch.manual_seed(0)
    m = lmzoo.build("jamba-debug").eval()
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (11, 3, 7)]
    batch = lmzoo.generate(m, prompts, 12, temperature=0.0)
    for p, got in zip(prompts, batch):
        assert got == lmzoo.generate(m, [p], 12, temperature=0.0)[0]
    ids, pad = left_pad(prompts)
    cache = m.init_cache(3, 20, pad=pad)
    assert not cache.ssm.real_tokens(11)[1, :8].any() and cache.ssm.real_tokens(11)[1, 8:].all()


def test_router_weights_the_chosen_experts_by_the_full_softmax_without_renormalizing():
    torch.manual_seed(0)
    moe = MoE(8, 16, n_experts=4, top_k=2, renormalize=False)
    x = torch.randn(5, 8)
    probs = F.softmax(moe.router(x), -1)
    top_p, top_i = probs.topk(2, -1)
    expected = sum(top_p[:, j, None] * torch.stack([moe.experts[e](x[n]) for n, e in enumerate(top_i[:, j])])
                   for j in range(2))
    y, _ = moe(x)
    assert (y - expected).abs().max() <= 1e-5
    assert (top_p.sum(-1) < 1).all()  # the weights do not sum to one (Mixtral's would)


def test_activation_checkpointing_keeps_the_gradients():
    torch.manual_seed(0)
    a = lmzoo.build("jamba-debug")
    b = lmzoo.build("jamba-debug")
    b.load_state_dict(a.state_dict())
    assert apply_activation_checkpointing(b) == 4
    x = torch.randint(0, VOCAB, (2, 20))
    a(x, x).loss.backward()
    b(x, x).loss.backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5


# --- transformers parity --------------------------------------------------------------------------------

HF_SETTINGS = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
    expert_layer_period=3, expert_layer_offset=0, mamba_d_state=8, mamba_dt_rank=5, mamba_d_conv=3,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


@pytest.fixture(scope="module")
def hf_model():
    """Layers mamba+MoE, attention+MLP, mamba+MLP, attention+MoE; weights spread out so that greedy
    decoding is not a flat argmax."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**HF_SETTINGS)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 8 + 0.5))
            elif name.endswith("dt_proj.bias"):
                p.normal_(-2.0, 1.0)
            elif p.dim() == 1:
                p.normal_(1.0 if "norm" in name or name.endswith(".D") else 0.0, 0.3)
            else:
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[-1]) if p.shape[-1] > 4 else 0.5)
    return hf


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-jamba")
    hf_model.save_pretrained(d)
    return d


def test_logits_greedy_continuation_and_round_trip_match_transformers(hf_model, hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = lmzoo.from_hf(hf_dir)
    assert model.family == "jamba" and [b.attention for b in model.blocks] == [False, True, False, True]
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [True, False, False, True]
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ref = hf_model(x).logits
        assert (model(x).logits - ref).abs().max().item() <= 1e-4

    prompts = x[:, :7]
    ours = lmzoo.generate(model, prompts.tolist(), 32, temperature=0.0)
    with torch.no_grad():
        theirs = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32,
                                   do_sample=False)
    assert ours == theirs[:, 7:].tolist()
    assert len(set(ours[0])) > 3  # a continuation that exercises the model, not one repeated token

    lmzoo.to_hf(model, tmp_path / "export")
    back = transformers.JambaForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max().item() <= 1e-4


def test_transformers5_fused_expert_layout_loads(hf_model, hf_dir, tmp_path):
    """transformers 5 keeps experts fused in memory (gate_up_proj, down_proj); such a file loads too."""
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    a, b = lmzoo.from_hf(hf_dir), lmzoo.from_hf(tmp_path)
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_config_maps_the_layer_pattern(hf_dir):
    cfg = lmzoo.from_hf(hf_dir).config
    assert (cfg.attn_every, cfg.attn_offset, cfg.moe_every, cfg.moe_offset) == (2, 1, 3, 0)
    assert (cfg.n_experts, cfg.n_experts_per_tok, cfg.d_conv, cfg.dt_rank) == (4, 2, 3, 5)
    hf = json.loads((hf_dir / "config.json").read_text())
    assert hf["model_type"] == "jamba"
