"""Untrusted files: every bad file is one clear error, before any large allocation.

Pickle payloads never run, truncated or bit-flipped safetensors are refused (lmzoo files carry a
SHA-256 of their tensors), absurd or mistyped configs fail in well under a second, tokenizer files
that are not tokenizers are refused, and a model too large for the machine is refused with its
estimate and what to do instead. The CLI turns each into one line on stderr with exit code 2.
(The pickle payload in an HF ``pytorch_model.bin`` read by from_hf is tested in test_hf_gpt2.py.)
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo import memguard
from lmzoo.cli.app import main
from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.models import build
from lmzoo.tokenizer import ByteTokenizer, load_tokenizer


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if the pickle runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    lmzoo.save(build("gpt2-debug", vocab_size=257), d, tokenizer=ByteTokenizer())
    return d


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    d = tmp_path / "hf"
    lmzoo.to_hf(build("gpt2-debug", vocab_size=257, n_kv_head=4), d)
    ByteTokenizer().save(d)  # a tokenizer beside the weights, so `lmzoo generate` gets that far
    return d


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmzoo: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def flip_bit(file: Path, where: str) -> None:
    """Flip one bit of a safetensors file: in its JSON header or in the middle of its tensor data."""
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    pos = 8 + n // 2 if where == "header" else 8 + n + (len(raw) - 8 - n) // 2
    raw[pos] ^= 0x10
    file.write_bytes(bytes(raw))


# -- pickle payloads ------------------------------------------------------------------------------


def test_pickle_payload_in_a_train_state_is_refused_and_never_runs(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "evil": _Payload(str(marker))}, ckpt / "train_state.pt")
    from lmzoo.formats.checkpoint import load_train_state

    with pytest.raises(CheckpointError, match="unreadable train state"):
        load_train_state(ckpt)
    assert not marker.exists()


def test_pickle_payload_in_a_sharded_bin_is_refused_through_the_cli(hf_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = {}
    with __import__("safetensors").safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    (hf_dir / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    torch.save({k: state[k] for k in names[:half]}, hf_dir / "pytorch_model-00001.bin")
    torch.save({**{k: state[k] for k in names[half:]}, "x": _Payload(str(marker))}, hf_dir / "pytorch_model-00002.bin")
    index = {"weight_map": {k: f"pytorch_model-0000{1 + (i >= half)}.bin" for i, k in enumerate(names)}}
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    code, err = run_cli(["generate", "--checkpoint", hf_dir, "--max-new-tokens", 2, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "weights_only", "pytorch_model-00002.bin")
    assert not marker.exists()


# -- truncated and bit-flipped safetensors ------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "header", "data"])
def test_damaged_lmzoo_checkpoint_is_refused(ckpt, damage, capsys):
    f = ckpt / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    else:
        flip_bit(f, damage)
    with pytest.raises(CheckpointError) as e:
        lmzoo.load(ckpt)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    code, err = run_cli(["generate", "--checkpoint", ckpt, "--max-new-tokens", 2, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "model.safetensors")
    if damage == "data":  # a flipped bit in a weight is caught by the checksum, not loaded silently
        assert "checksum mismatch" in err


@pytest.mark.parametrize("damage", ["truncate", "header", "data"])
def test_damaged_hf_safetensors_is_refused(hf_dir, damage):
    f = hf_dir / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    else:
        flip_bit(f, damage)
    with pytest.raises(CheckpointError) as e:
        lmzoo.from_hf(hf_dir)
    assert "\n" not in str(e.value)
    if damage == "data":
        assert "checksum mismatch" in str(e.value)


def test_checksums_do_not_break_old_files(ckpt, hf_dir):
    """Files without the checksum (older lmzoo, transformers) still load; undamaged ones load too."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in (ckpt / "model.safetensors", hf_dir / "model.safetensors"):
        with safe_open(str(f), "pt") as h:
            assert "lmzoo_sha256" in h.metadata()
            state = {k: h.get_tensor(k) for k in h.keys()}
        save_file(state, str(f), metadata={"format": "pt"})
    assert lmzoo.load(ckpt).num_params() > 0 and lmzoo.from_hf(hf_dir).num_params() > 0


# -- absurd and mistyped configs ------------------------------------------------------------------

ABSURD = {
    "1e9 layers": ({"n_layer": 10**9}, "n_layer"),
    "width 1e12": ({"n_embd": 10**12}, "n_embd"),
    "negative vocab": ({"vocab_size": -5}, "vocab_size"),
    "heads do not divide width": ({"n_head": 5}, "divisible"),
    "layers as text": ({"n_layer": "many"}, "n_layer"),
    "layers as a list": ({"n_layer": [1, 2]}, "n_layer"),
    "fractional width": ({"n_embd": 32.5}, "n_embd"),
    "null layers": ({"n_layer": None}, "n_layer"),
    "bias maybe": ({"bias": "maybe"}, "bias"),
    "unknown key": ({"n_layers": 4}, "n_layers"),
    "family a list": ({"family": ["gpt2"]}, "family"),
    "family unknown": ({"family": "gpt5"}, "gpt5"),
    "lmzoo section a string": ({"lmzoo": "x"}, "lmzoo"),
    "quantization junk": ({"lmzoo": {"quantization": {"method": "nope"}}}, "quantization"),
    "huge but valid sizes": ({"n_layer": 1000, "n_embd": 1 << 16, "n_head": 64}, "needs"),
}


@pytest.mark.parametrize("case", list(ABSURD), ids=list(ABSURD))
def test_absurd_config_json_fails_fast_with_one_line(ckpt, case, capsys):
    change, needle = ABSURD[case]
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **change}))
    t0 = time.perf_counter()
    with pytest.raises(LmzooError) as e:
        lmzoo.load(ckpt)
    assert time.perf_counter() - t0 < 1.0  # refused from the sizes alone: nothing was built
    assert needle in str(e.value) and "\n" not in str(e.value)
    code, err = run_cli(["info", "--checkpoint", ckpt], capsys)
    if "needs" not in needle:  # info describes a huge (valid) model without building it
        assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("raw", [b"\x00\xff garbage", b"[1, 2, 3]", b'"a string"', b""])
def test_config_json_that_is_not_an_object(ckpt, raw, capsys):
    (ckpt / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError):
        lmzoo.load(ckpt)
    assert_one_line_error(*run_cli(["info", "--checkpoint", ckpt], capsys), "config.json")


@pytest.mark.parametrize("change", [{"n_layer": 10**9}, {"n_embd": -64}, {"n_head": 7}, {"n_layer": "x"},
                                    {"n_layer": 1000, "n_embd": 1 << 16, "n_head": 64}])
def test_absurd_hf_config_fails_fast(hf_dir, change):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    t0 = time.perf_counter()
    with pytest.raises(LmzooError) as e:
        lmzoo.from_hf(hf_dir)
    assert time.perf_counter() - t0 < 1.0 and "\n" not in str(e.value)


# -- tokenizer files that are not tokenizers ------------------------------------------------------

BAD_TOKENIZERS = {
    "random bytes config": {"tokenizer_config.json": bytes(range(256)) * 4},
    "config a list": {"tokenizer_config.json": b"[1, 2]"},
    "format a string": {"tokenizer_config.json": b'{"lmzoo_tokenizer": "1", "kind": "byte"}'},
    "unknown kind": {"tokenizer_config.json": b'{"lmzoo_tokenizer": 1, "kind": "wordpiece"}'},
    "chars not characters": {"tokenizer_config.json": b'{"lmzoo_tokenizer": 1, "kind": "char", "chars": [1, 2]}'},
    "chars repeated": {"tokenizer_config.json": b'{"lmzoo_tokenizer": 1, "kind": "char", "chars": ["a", "a"]}'},
    "chars a string": {"tokenizer_config.json": b'{"lmzoo_tokenizer": 1, "kind": "char", "chars": "abc"}'},
    "specials a list": {"tokenizer_config.json": b'{"lmzoo_tokenizer": 1, "kind": "byte", "special_tokens": ["x"]}'},
    "specials bad ids": {"tokenizer_config.json":
                         b'{"lmzoo_tokenizer": 1, "kind": "byte", "special_tokens": {"<x>": "five"}}'},
    "specials not str": {"tokenizer_config.json":
                         b'{"lmzoo_tokenizer": 1, "kind": "byte", "special_tokens": {"<x>": [1]}}'},
    "eos not a string": {"tokenizer_config.json": b'{"lmzoo_tokenizer": 1, "kind": "byte", "eos_token": 7}'},
    "tokenizer.json random": {"tokenizer.json": bytes(range(256)) * 4},
    "tokenizer.json wrong shape": {"tokenizer.json": b'{"model": {"type": "BPE", "vocab": [1]}}'},
    "tokenizer.json a number": {"tokenizer.json": b"42"},
    "bpe without tokenizer.json": {"tokenizer_config.json": b'{"lmzoo_tokenizer": 1, "kind": "bpe"}'},
    "gpt2 vocab a list": {"vocab.json": b"[1]", "merges.txt": b"a b\n"},
    "gpt2 merges junk": {"vocab.json": b'{"a": 0}', "merges.txt": bytes(range(256))},
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS), ids=list(BAD_TOKENIZERS))
def test_tokenizer_file_that_is_not_one(tmp_path, case):
    d = tmp_path / "tok"
    d.mkdir()
    for name, data in BAD_TOKENIZERS[case].items():
        (d / name).write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    assert "\n" not in str(e.value)


def test_bad_tokenizer_in_a_checkpoint_is_one_cli_line(ckpt, capsys):
    (ckpt / "tokenizer" / "tokenizer_config.json").write_bytes(b'{"lmzoo_tokenizer": 1, "kind": 3}')
    code, err = run_cli(["generate", "--checkpoint", ckpt, "--max-new-tokens", 2, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "tokenizer")


# -- a model larger than the machine ----------------------------------------------------------------


@pytest.fixture
def tiny_ram(monkeypatch):
    """Pretend the machine has 64 KB free: gpt2-debug (110 KB of float32 weights) no longer fits."""
    monkeypatch.delenv(memguard.ENV, raising=False)
    monkeypatch.setattr(memguard, "available_bytes", lambda device="cpu": 64 * 1024)


def test_load_refuses_a_model_larger_than_memory_with_estimate_and_advice(ckpt, hf_dir, tiny_ram, monkeypatch):
    for load in (lmzoo.load, lmzoo.from_hf):
        with pytest.raises(memguard.ModelTooLargeError) as e:
            load(ckpt if load is lmzoo.load else hf_dir)
        msg = str(e.value)
        assert "needs" in msg and "KB" in msg and "64.0 KB available" in msg
        assert all(w in msg for w in ("bfloat16", "NF4", "FSDP", memguard.ENV))
    assert lmzoo.load(ckpt, check_memory=False).num_params() > 0  # the expert's way around
    assert lmzoo.from_hf(hf_dir, check_memory=False).num_params() > 0
    monkeypatch.setenv(memguard.ENV, "1")
    assert lmzoo.load(ckpt).num_params() > 0


def test_cli_refuses_too_large_models_in_one_line(ckpt, tmp_path, tiny_ram, capsys):
    code, err = run_cli(["generate", "--checkpoint", ckpt, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "needs about", "available")
    data = tmp_path / "data"
    code, err = run_cli(["train", "--model=gpt2-debug", "--max_steps=1", f"--data_dir={data}",
                         f"--out_dir={tmp_path / 'run'}", "--device=cpu"], capsys)
    assert_one_line_error(code, err, "weights, gradients and AdamW state", "--param_dtype=bfloat16")
    assert not data.exists()  # refused before preparing any data


def test_estimate_is_exact_enough_and_counts_without_allocating():
    from lmzoo.models import PRESETS, preset_config

    for preset in ("gpt2-debug", "llama-debug", "jamba-debug", "mamba-debug", "transformer-xl-debug",
                   "mixtral-debug"):
        model = build(preset)
        real = sum(t.numel() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
        cfg = preset_config(preset)
        assert memguard.count_elements(PRESETS[preset][0], cfg) == real
        assert real <= memguard.generous_params(cfg) <= 5 * real
    t0 = time.perf_counter()  # 70B parameters, counted on the meta device
    n = memguard.count_elements("llama", preset_config("llama2-70b"))
    assert 6.8e10 < n < 7.0e10 and time.perf_counter() - t0 < 5


def test_finetune_with_a_bad_base_is_one_line(tmp_path, capsys):
    for base in (tmp_path / "missing", tmp_path / "file.txt"):
        if base.name == "file.txt":
            base.write_text("not a checkpoint")
        code, err = run_cli(["finetune", base, "--max_steps=1", f"--out_dir={tmp_path / 'ft'}"], capsys)
        assert_one_line_error(code, err)


def test_config_errors_name_the_limit():
    from lmzoo.models import preset_config

    with pytest.raises(ConfigError, match=r"n_layer must be in 0..4,096, got 1,000,000,000"):
        preset_config("gpt2-debug", n_layer=10**9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_is_what_is_checked_on_a_gpu(ckpt):
    from lmzoo.models import preset_config

    free = memguard.available_bytes("cuda")
    assert free is not None and 0 < free <= torch.cuda.get_device_properties(0).total_memory
    cfg = preset_config("llama-debug", n_layer=2048, n_embd=8192, n_head=64)  # > 5e11 bytes: no GPU has that
    with pytest.raises(memguard.ModelTooLargeError, match="cuda has"):
        memguard.check_fits("llama", cfg, "cuda")
    assert lmzoo.load(ckpt, device="cuda").head.weight.is_cuda


def test_cuda_free_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """After a generation frees its cache, PyTorch keeps the blocks reserved: the driver reports them used,
    but the next cache of the same size fits in them (serve's second request must not be refused)."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gib)
    assert memguard.available_bytes("cuda") == 40 * gib
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 50 * gib)
    assert memguard.available_bytes("cuda") == 10 * gib
