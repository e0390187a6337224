"""The contract every registered model family keeps (docs/ARCHITECTURE.md).

Each family is picked up from the registry through its ``<family>-debug`` preset, plus the
variants listed in VARIANTS (positional encodings, GQA, norms, MLPs), so a new family is
tested by registering it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.decoding.generate import left_pad
from lmzoo.layers.attention import CausalSelfAttention
from lmzoo.models import FAMILIES, PRESETS, preset_config

VARIANTS: dict[str, list[dict]] = {
    "gpt2": [
        {},
        {"pos_emb": "rope"},
        {"pos_emb": "rope", "n_kv_head": 1, "bias": False, "norm": "rmsnorm", "mlp": "swiglu"},
        {"n_kv_head": 4, "mlp": "gelu", "tie_embeddings": False},
        {"n_experts": 4, "n_experts_per_tok": 2},  # sparse mixture of GELU experts
        {"pos_emb": "alibi", "n_head": 3, "n_embd": 36, "n_kv_head": 1},  # ALiBi, a non-power-of-two head count
        {"attention": "linear", "linear_chunk": 8},  # linear attention: recurrent state as the cache
        {"attention": "linear", "pos_emb": "none", "linear_feature_map": "relu", "n_kv_head": 4},
        {"attention": "infini", "pos_emb": "rope", "infini_segment": 8},  # Infini-attention
        {"attention": "infini", "pos_emb": "rope", "infini_segment": 5, "infini_delta_rule": True},
        {"kv_share_every": 2},  # cross-layer KV sharing (CLA2)
        {"kv_share_every": 2, "n_layer": 3, "pos_emb": "alibi", "n_kv_head": 1},  # a group of one at the end
    ],
    "transformer-xl": [
        {},  # post-norm, as in the paper
        {"pre_norm": True, "clamp_len": 6, "n_head": 2, "d_head": 12},
    ],
    "llama": [
        {},  # Llama 2: RMSNorm, SwiGLU, RoPE, GQA 2:1
        {"sliding_window": 8},  # Mistral: windows shorter than the tests' sequences, rolling cache
        {"n_experts": 4, "n_experts_per_tok": 2},  # Mixtral: top-2 of 4 experts
        # an odd head count (GQA 5:1), local/global layers, YaRN-scaled RoPE
        {"n_head": 5, "n_kv_head": 1, "n_embd": 40, "sliding_window": 5, "window_pattern": "LG",
         "rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max": 8},
    ],
    "mamba": [
        {},
        # the sequential reference scan, biased projections, no conv bias, a 2-wide convolution
        {"scan": "sequential", "bias": True, "conv_bias": False, "d_conv": 2, "dt_rank": 3},
    ],
    "jamba": [
        {},  # every mixer/feed-forward combination (see the jamba-debug preset)
        {"n_experts": 0, "attn_every": 3, "attn_offset": 0, "tie_embeddings": True, "n_kv_head": 1},
    ],
}

CASES = [
    pytest.param(fam, ov, id=f"{fam}-{i}")
    for fam in FAMILIES
    for i, ov in enumerate(VARIANTS.get(fam, [{}]))
]


def make(family: str, overrides: dict) -> lmzoo.models.LanguageModel:
    assert f"{family}-debug" in PRESETS, f"family {family} needs a {family}-debug preset"
    torch.manual_seed(0)
    return lmzoo.build(f"{family}-debug", **overrides).eval()


def vocab(model) -> int:
    return model.config.vocab_size


@pytest.mark.parametrize("family,overrides", CASES)
def test_forward_shapes_and_initial_loss(family, overrides):
    m = make(family, overrides)
    x = torch.randint(0, vocab(m), (3, 17))
    out = m(x, torch.randint(0, vocab(m), (3, 17)))
    assert out.logits.shape == (3, 17, vocab(m))
    # a fresh model predicts nearly uniformly: loss close to ln(vocab)
    assert abs(out.loss.item() - math.log(vocab(m))) < 0.5
    assert m(x, last_only=True).logits.shape == (3, 1, vocab(m))


@pytest.mark.parametrize("family,overrides", CASES)
def test_future_tokens_do_not_change_past_logits(family, overrides):
    m = make(family, overrides)
    x = torch.randint(0, vocab(m), (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, vocab(m), (2, 8))
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-5, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4  # and the future does matter


@pytest.mark.parametrize("family,overrides", CASES)
def test_cached_decoding_matches_full_forward(family, overrides):
    m = make(family, overrides)
    x = torch.randint(0, vocab(m), (2, 24))
    full = m(x).logits
    cache = m.init_cache(2, 24)
    steps = [m(x[:, t : t + 1], cache=cache).logits for t in range(24)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    # chunked prefill then single steps gives the same as well
    cache = m.init_cache(2, 24)
    parts = [m(x[:, :10], cache=cache).logits, m(x[:, 10:17], cache=cache).logits]
    parts += [m(x[:, t : t + 1], cache=cache).logits for t in range(17, 24)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


# Contract items that cannot apply to a variant, with the reason (the test checks the refusal instead).
LEFT_PAD_UNSUPPORTED = {
    ("gpt2", "infini"): "Infini-attention counts segments from the first slot of the batch; a left-padded "
    "row would see its segment boundaries shifted, so it cannot compute what it computes alone",
}


@pytest.mark.parametrize("family,overrides", CASES)
def test_cached_batch_of_different_lengths_matches_each_prompt_alone(family, overrides):
    m = make(family, overrides)
    if (family, overrides.get("attention")) in LEFT_PAD_UNSUPPORTED:
        with pytest.raises(ValueError, match="left-padded"):
            m.init_cache(2, 8, pad=torch.tensor([0, 3]))
        return
    lengths = [9, 4, 13]
    prompts = [torch.randint(0, vocab(m), (n,)).tolist() for n in lengths]
    ids, pad = left_pad(prompts)
    B, T = ids.shape
    cache = m.init_cache(B, T + 6, pad=pad)
    got = [m(ids, cache=cache).logits]
    nxt = torch.randint(0, vocab(m), (B, 6))
    got += [m(nxt[:, t : t + 1], cache=cache).logits for t in range(6)]
    got = torch.cat(got, 1)
    for b, p in enumerate(prompts):
        alone = m(torch.tensor([p + nxt[b].tolist()])).logits[0]
        assert (got[b, pad[b] :] - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("family,overrides", CASES)
def test_save_load_round_trip(family, overrides, tmp_path):
    m = make(family, overrides)
    x = torch.randint(0, vocab(m), (2, 11))
    lmzoo.save(m, tmp_path / "ckpt")
    m2 = lmzoo.load(tmp_path / "ckpt")
    assert type(m2) is type(m) and m2.config == m.config
    assert torch.equal(m(x).logits, m2(x).logits)


@pytest.mark.parametrize("family,overrides", CASES)
def test_overfits_one_batch(family, overrides):
    m = make(family, overrides).train()
    x = torch.randint(0, vocab(m), (2, 16))
    y = torch.randint(0, vocab(m), (2, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = m(x, y).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


@pytest.mark.parametrize("family,overrides", CASES)
def test_every_parameter_gets_a_gradient(family, overrides):
    m = make(family, overrides).train()
    x = torch.randint(0, vocab(m), (2, 12))
    m(x, x).loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("family,overrides", CASES)
def test_bfloat16_forward_is_close_to_float32(family, overrides):
    m = make(family, overrides)
    x = torch.randint(0, vocab(m), (2, 16))
    ref = m(x).logits
    got = m.to(torch.bfloat16)(x).logits.float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.parametrize("family,overrides", CASES)
def test_flops_and_params_are_consistent(family, overrides):
    m = make(family, overrides)
    n = m.num_params()
    assert n == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    assert m.flops_per_token(16) >= 6 * m.active_params()  # MoE: only the experts a token runs
    if m.flops_per_token(64) == m.flops_per_token(2):  # a recurrence (Mamba): the same cost at any context
        assert not any(isinstance(mod, CausalSelfAttention) for mod in m.modules())
    else:  # attention grows with context (with a sliding window: until the context reaches the window)
        assert m.flops_per_token(64) >= m.flops_per_token(16) > m.flops_per_token(2)


def test_sdpa_and_reference_attention_agree():
    torch.manual_seed(0)
    a = lmzoo.build("gpt2-debug", attn_backend="sdpa").eval()
    b = lmzoo.build("gpt2-debug", attn_backend="reference").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 30))
    torch.testing.assert_close(a(x).logits, b(x).logits, atol=1e-5, rtol=1e-5)
    ca, cb = a.init_cache(2, 30), b.init_cache(2, 30)
    a(x[:, :20], cache=ca), b(x[:, :20], cache=cb)
    torch.testing.assert_close(a(x[:, 20:], cache=ca).logits, b(x[:, 20:], cache=cb).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_preset_has_exactly_124_439_808_parameters():
    with torch.device("meta"):
        m = lmzoo.build("gpt2")
    assert m.num_params() == 124_439_808


@pytest.mark.parametrize("preset", ["gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-improved"])
def test_large_presets_build_on_meta(preset):
    with torch.device("meta"):
        m = lmzoo.build(preset)
    assert m.num_params() > 100_000_000


def test_config_round_trips_through_json():
    cfg = preset_config("gpt2-improved")
    assert type(cfg).from_dict(__import__("json").loads(cfg.to_json())) == cfg


def test_crop_block_size_keeps_the_shorter_context_identical():
    m = make("gpt2", {})
    x = torch.randint(0, 97, (1, 16))
    before = m(x).logits
    m.crop_block_size(16)
    assert m.config.block_size == 16 and m.pos_embed.weight.shape[0] == 16
    torch.testing.assert_close(m(x).logits, before)
    with pytest.raises(ValueError, match="position"):
        m(torch.randint(0, 97, (1, 17)))


def test_gqa_shrinks_the_kv_cache():
    full = lmzoo.build("gpt2-debug", n_kv_head=4).init_cache(1, 32)
    gqa = lmzoo.build("gpt2-debug", n_kv_head=1).init_cache(1, 32)
    assert full.nbytes == 4 * gqa.nbytes


# -- the contract in code: parts, transforms, pipeline stages, decoding state -------------------------

def test_every_family_names_its_parts_the_same_way():
    from lmzoo.models.base import Block, Blocks, LanguageModel

    for family, overrides in [c.values for c in CASES]:
        m = make(family, overrides)
        assert isinstance(m, LanguageModel) and isinstance(m.blocks, Blocks), family
        assert isinstance(m.embed, torch.nn.Embedding) and isinstance(m.head, torch.nn.Linear), family
        assert len(m.blocks) == m.config.n_layer and [i for i, _ in m.blocks.indexed()] == list(range(len(m.blocks)))
        for block in m.blocks:
            assert isinstance(block, Block) and block.mixer is not None, family
            assert (block.ffn is None) == (block.ffn_norm is None), family
        # the parameters live under those names and no others
        tops = {n.split(".")[0] for n, _ in m.named_parameters()}
        parts = {n.split(".")[2] for n, _ in m.named_parameters() if n.startswith("blocks.")}
        assert tops <= {"embed", "pos_embed", "blocks", "norm", "head"}, (family, tops)
        assert parts <= {"mixer_norm", "mixer", "ffn_norm", "ffn"}, (family, parts)


def _transform(name: str, m):
    """Apply the transform ``name`` with its defaults; return the names of the modules it converted."""
    from lmzoo.layers.bitlinear import BitLinear
    from lmzoo.peft.lora import LoRALinear, apply_lora
    from lmzoo.peft.qlora import quantize_model
    from lmzoo.quant.bitnet import convert
    from lmzoo.quant.nf4 import NF4Linear

    kinds = {"lora": (lambda: apply_lora(m, r=2), LoRALinear),
             "nf4": (lambda: quantize_model(m, compute_dtype=torch.float32), NF4Linear),
             "bitnet": (lambda: convert(m), BitLinear)}
    apply, kind = kinds[name]
    apply()
    return sorted(n for n, mod in m.named_modules() if isinstance(mod, kind))


@pytest.mark.parametrize("transform", ["lora", "nf4", "bitnet"])
@pytest.mark.parametrize("family,overrides", CASES)
def test_linear_transforms_reach_every_familys_mixer_and_ffn(family, overrides, transform):
    """LoRA's default adapts every block's mixer linears; NF4 and BitNet quantize every mixer and ffn linear
    but those the layer keeps precise (a router, an SSM's selective projections), in every family alike.
    Nothing else is touched, and the model still computes a finite loss."""
    m = make(family, overrides)
    expected = m.part_linears(("mixer",)) if transform == "lora" else [
        n for n in m.part_linears() if n.rpartition(".")[2] not in getattr(
            m.get_submodule(n.rpartition(".")[0]), "keep_precise", {})]
    assert expected, f"the {family} model has nothing to convert"
    assert _transform(transform, m) == sorted(expected)
    assert type(m.head) is torch.nn.Linear and type(m.embed) is torch.nn.Embedding
    if transform != "lora":  # what a layer keeps precise stays a plain Linear
        for n in m.part_linears():
            if n not in expected:
                assert type(m.get_submodule(n)) is torch.nn.Linear, n
    x = torch.randint(0, vocab(m), (2, 12))
    assert torch.isfinite(m(x, x).loss)


@pytest.mark.parametrize("family,overrides", CASES)
def test_multi_token_heads_wrap_every_kv_family_and_refuse_the_rest_by_name(family, overrides):
    """Multi-token heads run copies of the last block with a KV cache that rolls back: they wrap a model
    whose decoding state can roll back, with dense ffns and no cross-layer sharing, and refuse any other
    in one line naming the family; when they wrap it, self-speculative decoding equals greedy decoding."""
    from lmzoo.errors import ConfigError
    from lmzoo.layers.moe import MoE
    from lmzoo.models.mtp import MultiTokenLM, self_speculative_generate

    m = make(family, overrides)
    ok = (m.init_cache(1, 1, rollback=True).can_rollback and not any(isinstance(b.ffn, MoE) for b in m.blocks)
          and overrides.get("kv_share_every", 1) == 1)
    if not ok:
        with pytest.raises(ConfigError, match=family):
            MultiTokenLM(m, n_future=2)
        return
    mtp = MultiTokenLM(m, n_future=3).eval()
    assert [n for n, _ in mtp.block_modules()][-2:] == ["heads.0.block", "heads.1.block"]
    x = torch.randint(0, vocab(m), (2, 10))
    assert torch.isfinite(mtp(x, x).loss)
    prompt = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got, _ = self_speculative_generate(mtp, prompt, 6)
    assert got == lmzoo.generate(m, prompt, 6, temperature=0)


@pytest.mark.parametrize("family,overrides", CASES)
def test_activation_checkpointing_wraps_every_block_and_keeps_the_gradients(family, overrides):
    from lmzoo.train.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 12))
    grads = []
    for wrapped in (False, True):
        m = make(family, overrides).train()
        if wrapped:
            assert apply_activation_checkpointing(m) == len(m.block_modules())
        m.zero_grad()
        torch.manual_seed(1)  # dropout, if any, draws the same in both runs
        m(x % vocab(m), x % vocab(m)).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@pytest.mark.parametrize("family,overrides", CASES)
def test_precision_keeps_every_norm_in_float32(family, overrides):
    from lmzoo.train.precision import apply_precision

    m = apply_precision(make(family, overrides), torch.bfloat16)
    norms = [b.mixer_norm for b in m.blocks] + [b.ffn_norm for b in m.blocks if b.ffn_norm is not None]
    norms += [m.norm] if m.norm is not None else []
    assert norms and all(p.dtype == torch.float32 for n in norms for p in n.parameters())
    assert m.head.weight.dtype == torch.bfloat16
    x = torch.randint(0, vocab(m), (2, 12))
    assert torch.isfinite(m(x).logits.float()).all()


@pytest.mark.parametrize("family,overrides", CASES)
def test_pipeline_stages_chained_equal_the_full_forward(family, overrides):
    """A pipeline stage is the model with the parts it does not hold set to None; chained, the stages
    compute the full forward's logits, and their router losses sum to the full model's."""
    from lmzoo.distributed.pipeline import check_family, stage_bounds, stage_of
    from lmzoo.errors import ConfigError
    from lmzoo.layers.moe import MoE

    m = make(family, overrides)
    if overrides.get("kv_share_every", 1) > 1:  # a block reads another layer's keys/values: refused by name
        with pytest.raises(ConfigError, match=family):
            check_family(family, m.config)
        return
    check_family(family, m.config)
    x = torch.randint(0, vocab(m), (2, 12))
    full = m(x)
    n_moe = sum(isinstance(b.ffn, MoE) for b in m.blocks)
    for n in range(2, m.config.n_layer + 1):
        h, balance = x, 0.0
        for r, (start, end) in enumerate(stage_bounds(m.config.n_layer, n)):
            stage = stage_of(m, start, end, r == 0, r == n - 1, m.config.tie_embeddings)
            assert len(stage.blocks) == end - start and (stage.head is None) == (r < n - 1)
            out = stage(h)
            h = out.logits
            if out.aux is not None:
                balance += float(out.aux["moe_balance"]) * sum(isinstance(b.ffn, MoE) for b in stage.blocks)
        assert torch.equal(h, full.logits), n
        if n_moe:
            assert math.isclose(balance / n_moe, float(full.aux["moe_balance"]), rel_tol=1e-5)
    assert len(m.blocks) == m.config.n_layer  # cutting stages leaves the model whole


@pytest.mark.parametrize("family,overrides", CASES)
def test_decoding_state_declares_what_it_can_do(family, overrides):
    """Every family's decoding state derives from the one base; its capabilities are declared and hold:
    a state that says it can roll back decodes again from a rolled-back position exactly as before."""
    from lmzoo.cache import DecodingState

    m = make(family, overrides)
    x = torch.randint(0, vocab(m), (1, 10))
    cache = m.init_cache(1, 16, rollback=True)
    assert isinstance(cache, DecodingState) and cache.pos == 0
    first = m(x, cache=cache).logits
    assert cache.pos == 10 and cache.nbytes > 0
    if cache.can_rollback:
        cache.rollback(6)
        again = m(x[:, 6:], cache=cache).logits
        assert (again - first[:, 6:]).abs().max() <= 1e-5
    else:
        with pytest.raises(ValueError, match="cannot roll back"):
            cache.rollback(6)
    cache.reset()
    assert cache.pos == 0 and (m(x, cache=cache).logits - first).abs().max() <= 1e-5


LEGACY = sorted(p for p in (Path(__file__).parent / "fixtures" / "legacy").iterdir() if p.is_dir())


@pytest.mark.parametrize("ckpt", LEGACY, ids=lambda p: p.name)
def test_checkpoints_written_before_the_shared_part_names_still_load(ckpt):
    """Checkpoints saved before the parts got their shared names (GPT-2's wte/ln_1/attn/mlp/lm_head,
    Llama's attn_norm/norm_f, ...; LoRA, NF4, BitNet and multi-token settings naming modules) load through
    the families' rename maps and compute the logits they were saved with (to float32 rounding: another
    thread count or CPU may sum in another order; a wrong name would be off by whole units)."""
    from safetensors.torch import load_file

    m = lmzoo.load(ckpt)
    expected = load_file(str(ckpt / "expected.safetensors"))
    with torch.no_grad():
        assert (m(expected["idx"]).logits - expected["logits"]).abs().max() <= 1e-5
