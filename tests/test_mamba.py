"""Mamba: the three scans agree, the parallel scan's gradients, recurrent decoding, and transformers parity.

The HF model is a tiny random ``MambaForCausalLM`` built and saved here, loaded through the real
converter; transformers runs its plain-PyTorch path on CPU (no ``mamba_ssm``). Nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.cache import MambaCache
from lmzoo.layers.ssm import SelectiveSSM, selective_scan, selective_scan_ref, selective_scan_step
from lmzoo.train.activation_checkpointing import apply_activation_checkpointing

VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scan_inputs(T: int, b: int = 2, d: int = 6, n: int = 5, seed: int = 0):
    """Random selective-scan inputs with Δ and A spread over decades, as after training."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, T, d, generator=g)
    delta = F.softplus(torch.randn(b, T, d, generator=g) * 2 - 2)
    A = -torch.exp(torch.randn(d, n, generator=g))
    B, C = torch.randn(b, T, n, generator=g), torch.randn(b, T, n, generator=g)
    h0 = torch.randn(b, d, n, generator=g)
    return [u, delta, A, B, C, h0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# --- the scan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 16, 63, 100, 257])
def test_sequential_parallel_and_recurrent_scans_agree(T):
    u, delta, A, B, C, h0 = scan_inputs(T)
    y_ref, h_ref = selective_scan_ref(u, delta, A, B, C, h0)
    y_par, h_par = selective_scan(u, delta, A, B, C, h0, chunk=8, segment=32)  # several segments and chunks
    h = h0.clone()
    y_rec = torch.stack([selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], h) for t in range(T)],
                        dim=1)
    for y, hT in ((y_par, h_par), (y_rec, h)):
        assert rel(y, y_ref) <= 1e-4 and rel(hT, h_ref) <= 1e-4


@pytest.mark.parametrize("chunk,segment", [(1, 1), (4, 4), (4, 12), (16, 256)])
def test_chunk_and_segment_sizes_do_not_change_the_result(chunk, segment):
    u, delta, A, B, C, h0 = scan_inputs(45)
    y_ref, _ = selective_scan_ref(u, delta, A, B, C, h0)
    assert rel(selective_scan(u, delta, A, B, C, h0, chunk, segment)[0], y_ref) <= 1e-4


@pytest.mark.parametrize("T", [5, 37, 130])
def test_parallel_scan_gradients_match_the_sequential_scan(T):
    inputs = [t.requires_grad_() for t in scan_inputs(T, seed=T)]
    gy, gh = torch.randn(2, T, 6), torch.randn(2, 6, 5)  # a loss on every output and on the final state

    def grads(fn):
        y, h = fn(*inputs)
        return torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)

    ref = grads(selective_scan_ref)
    par = grads(lambda *x: selective_scan(*x, chunk=4, segment=16))
    for name, g_par, g_ref in zip(("u", "delta", "A", "B", "C", "h0"), par, ref):
        assert rel(g_par, g_ref) <= 1e-4, name


def test_parallel_scan_passes_gradcheck_in_float64():
    u, delta, A, B, C, h0 = (t.double().requires_grad_() for t in scan_inputs(11, b=1, d=2, n=3))
    from lmzoo.layers.ssm import _ChunkedScan

    assert torch.autograd.gradcheck(lambda *x: _ChunkedScan.apply(*x, 2, 4), (u, delta, A, B, C, h0))


def test_parallel_scan_keeps_only_its_inputs_and_one_state_per_segment_for_backward():
    """Memory linear in T at the inputs' width (B, T, d or N), never the (B, T, d, N) states."""

    def saved(T: int) -> int:
        u, delta, A, B, C, _ = (t.requires_grad_() for t in scan_inputs(T, b=2, d=32, n=16))
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan(u, delta, A, B, C, chunk=8, segment=64)
        return sum(storages.values())

    states = 2 * 512 * 32 * 16 * 4  # bytes of all the states at T = 512
    assert saved(512) < states / 4
    assert abs(saved(1024) - 2 * saved(512)) <= 0.02 * saved(512) + 2 * 32 * 16 * 4  # linear in T


def test_padding_stays_out_of_the_state():
    """Zeroed inputs at left-padding slots leave the conv and SSM states where a fresh row starts."""
    torch.manual_seed(0)
    layer = SelectiveSSM(16, d_state=4).eval()
    x = torch.randn(1, 9, 16)
    pad = 3
    padded = torch.cat([torch.randn(1, pad, 16) * 100, x], 1)  # garbage in the padding slots
    c1 = MambaCache(1, 1, layer.d_inner, layer.d_conv, layer.d_state, pad=torch.tensor([pad]))
    c2 = MambaCache(1, 1, layer.d_inner, layer.d_conv, layer.d_state)
    with torch.no_grad():
        a = layer(padded, c1)[:, pad:]
        b = layer(x, c2)
    assert (a - b).abs().max() <= 1e-5
    assert torch.allclose(c1.ssm, c2.ssm, atol=1e-6) and torch.allclose(c1.conv, c2.conv, atol=1e-6)


# --- the model -----------------------------------------------------------------------------------------


def test_recurrent_decoding_equals_the_full_forward_at_every_position():
    torch.manual_seed(0)
    m = lmzoo.build("mamba-debug", scan_chunk=4, scan_segment=8).eval()  # 50 tokens: many segments
    x = torch.randint(0, VOCAB, (2, 50))
    with torch.no_grad():
        full = m(x).logits
        cache = m.init_cache(2)
        steps = torch.cat([m(x[:, t : t + 1], cache=cache).logits for t in range(50)], 1)
        cache = m.init_cache(2)  # a chunked prefill (the parallel scan from a cached state), then steps
        parts = [m(x[:, :21], cache=cache).logits, m(x[:, 21:40], cache=cache).logits]
        parts += [m(x[:, t : t + 1], cache=cache).logits for t in range(40, 50)]
    assert (steps - full).abs().max() <= 1e-4
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


def test_sequential_and_chunked_models_compute_the_same_loss_and_gradients():
    torch.manual_seed(0)
    a = lmzoo.build("mamba-debug")
    b = lmzoo.build("mamba-debug", scan="sequential")
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, VOCAB, (2, 30))
    la, lb = a(x, x).loss, b(x, x).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert rel(p.grad, q.grad) <= 1e-4, name


def test_activation_checkpointing_keeps_the_gradients():
    torch.manual_seed(0)
    a = lmzoo.build("mamba-debug")
    b = lmzoo.build("mamba-debug")
    b.load_state_dict(a.state_dict())
    assert apply_activation_checkpointing(b) == 2
    x = torch.randint(0, VOCAB, (2, 20))
    a(x, x).loss.backward()
    b(x, x).loss.backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5


def test_decoding_state_does_not_grow_with_the_generated_length():
    m = lmzoo.build("mamba-debug")
    assert m.init_cache(3, 10).nbytes == m.init_cache(3, 100_000).nbytes
    assert m.flops_per_token(16) == m.flops_per_token(4096)


def test_presets_have_the_published_shapes_and_parameter_counts():
    """Parameter counts against transformers' MambaForCausalLM of the same shapes, both on the meta device."""
    transformers = pytest.importorskip("transformers")
    for preset, (d, n_layer, expected) in {
        "mamba-130m": (768, 24, 129_135_360), "mamba-370m": (1024, 48, 371_516_416),
        "mamba-790m": (1536, 48, 793_204_224), "mamba-1.4b": (2048, 48, 1_372_178_432),
        "mamba-2.8b": (2560, 64, 2_768_345_600),
    }.items():
        with torch.device("meta"):
            ours = lmzoo.build(preset)
            hf = transformers.MambaForCausalLM(transformers.MambaConfig(
                vocab_size=50280, hidden_size=d, num_hidden_layers=n_layer, state_size=16))
        assert ours.config.n_embd == d and ours.config.n_layer == n_layer
        n_hf = sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
        assert ours.num_params() == n_hf == expected, preset


# --- transformers parity --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random MambaForCausalLM, its weights spread out so greedy decoding is not a flat argmax."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=24, state_size=6, num_hidden_layers=3, expand=2, time_step_rank=5,
        conv_kernel=3, use_bias=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = transformers.MambaForCausalLM(cfg).eval()
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
    d = tmp_path_factory.mktemp("hf-mamba")
    hf.save_pretrained(d)
    return d


def test_logits_greedy_continuation_and_round_trip_match_transformers(hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MambaForCausalLM.from_pretrained(hf_dir).eval()
    model = lmzoo.from_hf(hf_dir)
    assert model.family == "mamba" and model.config.d_conv == 3 and model.config.dt_rank == 5
    x = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x).logits - ref).abs().max().item() <= 1e-4

    prompts = x[:, :7]
    ours = lmzoo.generate(model, prompts.tolist(), 32, temperature=0.0)
    with torch.no_grad():
        theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32,
                             do_sample=False)
    assert ours == theirs[:, 7:].tolist()
    assert len(set(ours[0])) > 3  # a continuation that exercises the model, not one repeated token

    lmzoo.to_hf(model, tmp_path / "export")
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max().item() <= 1e-4
