"""Tokenizers: exact round trips, vocabularies, save/load in every format, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmzoo.errors import CheckpointError, ConfigError, DataError, LmzooError
from lmzoo.tokenizer import (
    EOT,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Grüße aus Köln — naïve café, 東京, emoji 🙂🚀\n" * 5,
    "\t\tindented\r\nwindows line\r\n   spaces   \n",
]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe(CORPUS * 3, vocab_size=330)


# ---------------------------------------------------------------- byte


@given(st.text())
def test_byte_roundtrip_any_unicode(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@given(st.binary())
def test_byte_roundtrip_any_bytes(data: bytes) -> None:
    tok = ByteTokenizer()
    assert tok.decode_bytes(tok.encode(data)) == data
    # bytes read as surrogate-escaped text (how sources pass undecodable files) give the same ids
    assert tok.encode(data.decode("utf-8", "surrogateescape")) == list(data)


def test_byte_special_tokens_are_literal_unless_allowed() -> None:
    tok = build_tokenizer("byte")
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.special_tokens == {EOT: 256}
    assert tok.encode(f"a{EOT}b") == list(f"a{EOT}b".encode())
    assert tok.encode(f"a{EOT}b", allow_special=True) == [97, 256, 98]
    assert tok.decode([97, 256, 98]) == f"a{EOT}b"


def test_decode_accepts_tensor_and_numpy_and_rejects_out_of_range_ids() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == "héllo"
    with pytest.raises(DataError, match="token id 300 is outside"):
        tok.decode([104, 300])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids, ids]))


# ---------------------------------------------------------------- char


def test_char_vocabulary_is_sorted_set_of_corpus_characters() -> None:
    tok = build_tokenizer("char", ["hello", "world!"])
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == sorted(set("helloworld!"))
    assert tok.vocab_size == len(tok.chars) and tok.eos_id is None
    assert tok.decode(tok.encode("world hello"[6:])) == "hello"


def test_char_tiny_shakespeare_has_65_symbols() -> None:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = build_tokenizer("char", text)
    assert tok.vocab_size == 65
    assert "".join(tok.chars) == "".join(sorted(set(text)))  # nanoGPT's stoi/itos
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_char_unknown_character_names_it_and_its_position() -> None:
    tok = build_tokenizer("char", "abc")
    with pytest.raises(
        DataError, match=r"character 'z' \(U\+007A\) at position 3 is not in the char vocabulary"
    ):
        tok.encode("abcz")


def test_char_invalid_utf8_bytes_report_the_offset() -> None:
    tok = build_tokenizer("char", "abc")
    with pytest.raises(DataError, match="byte offset 2 .*0xff"):
        tok.encode(b"ab\xffc")
    with pytest.raises(DataError, match="not valid UTF-8.*0xfe"):
        build_tokenizer("char", b"ab\xfe".decode("utf-8", "surrogateescape"))


def test_char_with_eos_special() -> None:
    tok = build_tokenizer("char", "ab", special_tokens=[EOT])
    assert tok.vocab_size == 3 and tok.eos_id == 2
    assert tok.encode(f"a{EOT}", allow_special=True) == [0, 2]
    assert tok.decode([0, 2, 1]) == f"a{EOT}b"


# ---------------------------------------------------------------- bpe


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_bpe_roundtrip_any_unicode(bpe: HFTokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary())
def test_bpe_roundtrip_any_bytes(bpe: HFTokenizer, data: bytes) -> None:
    assert bpe.byte_level
    assert bpe.decode_bytes(bpe.encode(data)) == data


def test_bpe_learns_merges_and_compresses(bpe: HFTokenizer) -> None:
    assert bpe.kind == "bpe" and bpe.vocab_size == 330
    assert train_bpe(["tiny"], vocab_size=1000).vocab_size < 1000  # stops when no pair is left
    assert bpe.special_tokens == {EOT: 0} and bpe.eos_id == 0
    text = CORPUS[1]
    assert len(bpe.encode(text)) < len(text.encode()) / 3
    assert bpe.encode_batch(CORPUS) == [bpe.encode(t) for t in CORPUS]


def test_bpe_special_string_is_text_unless_allowed(bpe: HFTokenizer) -> None:
    assert 0 not in bpe.encode(f"x{EOT}y")
    ids = bpe.encode(f"x{EOT}y", allow_special=True)
    assert ids.count(0) == 1 and bpe.decode(ids) == f"x{EOT}y"


def test_bpe_vocab_too_small_is_a_data_error() -> None:
    with pytest.raises(DataError, match="vocab_size 200 is too small.*at least 257"):
        train_bpe(["hello"], vocab_size=200)


def test_build_tokenizer_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="did you mean: bpe"):
        build_tokenizer("bep", "x")
    with pytest.raises(ConfigError, match="bpe tokenizer only"):
        build_tokenizer("byte", "x", vocab_size=300)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_roundtrip(tmp_path: Path, kind: str) -> None:
    text = "".join(CORPUS)
    tok = build_tokenizer(kind, CORPUS, vocab_size=300 if kind == "bpe" else None)
    tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok/tokenizer_config.json").read_text())
    assert config["kind"] == kind and config["vocab_size"] == tok.vocab_size
    assert (tmp_path / "tok/tokenizer.json").is_file() == (kind == "bpe")
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok) and loaded.kind == kind
    assert (loaded.vocab_size, loaded.special_tokens, loaded.eos_id) == (
        tok.vocab_size,
        tok.special_tokens,
        tok.eos_id,
    )
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == text
    assert not list((tmp_path / "tok").glob(".*"))  # no temporaries left behind


def test_load_finds_tokenizer_subdirectory(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path / "run" / "tokenizer")
    assert load_tokenizer(tmp_path / "run").kind == "byte"


def test_pretrained_hf_tokenizer_json(tmp_path: Path, bpe: HFTokenizer) -> None:
    bpe._tk.save(str(tmp_path / "tokenizer.json"))
    # transformers writes its own tokenizer_config.json; it must not be mistaken for an lmzoo one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOT}}))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "pretrained" and tok.eos_id == bpe.eos_id and tok.vocab_size == bpe.vocab_size
    for text in CORPUS:
        assert tok.encode(text) == bpe.encode(text)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(CORPUS[0]) == bpe.encode(CORPUS[0])


def test_pretrained_gpt2_vocab_and_merges(tmp_path: Path, bpe: HFTokenizer) -> None:
    bpe._tk.model.save(str(tmp_path))  # writes vocab.json + merges.txt, the GPT-2 release format
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt"}
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "pretrained" and tok.eos_id == bpe.eos_id
    for text in CORPUS:
        assert tok.encode(text) == bpe.encode(text)
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode(CORPUS[2]) == bpe.encode(CORPUS[2])


def test_gpt2_files_match_transformers(tmp_path: Path, bpe: HFTokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    bpe._tk.model.save(str(tmp_path))
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))  # a local dir: no download
    tok = load_tokenizer(tmp_path)
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text)


@pytest.mark.parametrize(
    "files, match",
    [
        ({}, "no tokenizer in"),
        ({"tokenizer.json": "{not json"}, "is not a tokenizers file"),
        ({"tokenizer.json": "{}"}, "is not a tokenizers file"),
        ({"tokenizer_config.json": "[1, 2"}, "not valid JSON"),
        ({"tokenizer_config.json": '{"lmzoo_tokenizer": 1, "kind": "bytes"}'}, "did you mean: byte"),
        ({"tokenizer_config.json": '{"lmzoo_tokenizer": 99, "kind": "byte"}'}, "format 99"),
        ({"tokenizer_config.json": '{"lmzoo_tokenizer": 1, "kind": "bpe"}'}, "tokenizer.json is missing"),
        ({"vocab.json": "[]", "merges.txt": ""}, "not a GPT-2 vocab.json"),
    ],
)
def test_not_a_tokenizer_is_a_one_line_error(tmp_path: Path, files: dict[str, str], match: str) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(LmzooError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "nope")


def test_every_kind_is_a_tokenizer() -> None:
    for tok in (ByteTokenizer(), CharTokenizer("ab"), train_bpe(["ab"], 260)):
        assert isinstance(tok, Tokenizer)
        assert tok.kind in repr(tok)
