"""lmzoo finetune: LoRA through the shared trainer, adapter written, resumable; full with frozen parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmzoo
from lmzoo.peft.finetune import finetune
from lmzoo.peft.lora import load_adapter
from lmzoo.tokenizer import ByteTokenizer


def _base(tmp_path):
    torch.manual_seed(0)
    model = lmzoo.build("gpt2-debug", vocab_size=257)
    lmzoo.save(model, tmp_path / "base", ByteTokenizer())
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return text


def _args(tmp_path, text, **kw):
    args = dict(source=str(text), tokenizer="byte", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
                max_steps=4, batch_size=4, block_size=32, eval_interval=2, eval_iters=1, warmup_steps=0,
                sample_tokens=0, progress=False, device="cpu")
    return {**args, **kw}


def test_lora_finetune_writes_adapter(tmp_path):
    text = _base(tmp_path)
    s = finetune(tmp_path / "base", method="lora", target="mixer.qkv|ffn.fc", r=2, **_args(tmp_path, text))
    assert s["trainable"] == 2 * (2 * (32 + 64) + 2 * (32 + 128))
    model = load_adapter(lmzoo.load(tmp_path / "base"), s["adapter_dir"])
    assert any(m.lora_B.abs().sum() > 0 for n, m in model.named_modules() if hasattr(m, "lora_B"))


def _adapter(summary) -> dict[str, torch.Tensor]:
    return load_file(str(Path(summary["adapter_dir"]) / "adapter.safetensors"))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_resumed_lora_and_qlora_finetunes_end_bit_identical(tmp_path, method):
    """Stopped after 4 of 6 steps and resumed, a fine-tune ends with the same adapters, bit for bit, and the
    same val loss as one that ran straight through (the schedule's horizon fixed by decay_steps)."""
    text = _base(tmp_path)
    kw = dict(method=method, target="mixer.qkv|ffn.fc", r=2)
    run = lambda name, **a: finetune(tmp_path / "base", **kw, **_args(tmp_path, text, decay_steps=6,  # noqa: E731
                                                                        out_dir=str(tmp_path / name), **a))
    straight = run("straight", max_steps=6)
    assert run("resumed", max_steps=4)["step"] == 4
    resumed = run("resumed", max_steps=6, resume=True)
    assert resumed["step"] == straight["step"] == 6
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))  # the adapters trained
    assert resumed["val_loss"] == straight["val_loss"]


def test_adapter_initialization_follows_the_seed(tmp_path):
    """Two fine-tunes with the same seed in one process start from (and so end with) the same adapters,
    whatever ran before them; another seed gives others."""
    text = _base(tmp_path)
    run = lambda name, seed: _adapter(finetune(tmp_path / "base", method="lora", target="mixer.qkv", r=2,  # noqa: E731
                                               **_args(tmp_path, text, max_steps=1, seed=seed,
                                                       out_dir=str(tmp_path / name))))
    first = run("a", 5)
    torch.manual_seed(123)  # the global generator moved on, as any earlier work in the process would
    again, other = run("b", 5), run("c", 6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first if k.endswith("lora_A"))


def test_full_finetune_with_frozen_embeddings(tmp_path):
    text = _base(tmp_path)
    s = finetune(tmp_path / "base", method="full", freeze=r"^embed\.|^pos_embed\.", **_args(tmp_path, text))
    base = lmzoo.build("gpt2-debug", vocab_size=257)
    assert s["trainable"] == base.num_params() - base.embed.weight.numel() - base.pos_embed.weight.numel()


def test_cli_finetune_lora(tmp_path, capsys):
    from lmzoo.cli.app import main

    text = _base(tmp_path)
    args = _args(tmp_path, text)
    extra = [f"--{k}={v}" for k, v in args.items()]
    assert main(["finetune", str(tmp_path / "base"), "--method=qlora", "--target=mixer.proj", "--r=2", *extra]) == 0
    out = capsys.readouterr().out
    assert "adapter:" in out and (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()


def test_lora_finetune_from_a_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = _base(tmp_path)
    cfg = transformers.GPT2Config(vocab_size=257, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    s = finetune(tmp_path / "hf", method="lora", target="mixer.qkv", r=2, **_args(tmp_path, text))
    assert s["step"] == 4 and s["trainable"] == 2 * 2 * (32 + 96)


def test_data_in_another_tokenizer_is_refused(tmp_path, capsys):
    from lmzoo.cli.app import main

    text = _base(tmp_path)  # the base was saved with the byte tokenizer
    extra = [f"--{k}={v}" for k, v in _args(tmp_path, text, tokenizer="char").items()]
    code = main(["finetune", str(tmp_path / "base"), "--method=full", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmzoo:")]  # (tqdm writes progress there too)
    assert code == 2 and len(lines) == 1 and "not in the base model's or teacher's tokenizer" in lines[0]
    assert "Traceback" not in err
