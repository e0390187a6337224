"""Data: sources, prepare (split sizes, meta, atomicity, errors) and the token loader."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmzoo.data import TokenLoader, is_val_document, load_meta, open_source, prepare, sources
from lmzoo.data.prepare import token_dtype
from lmzoo.data.sources import iter_file_pieces
from lmzoo.errors import ConfigError, DataError
from lmzoo.tokenizer import EOT, load_tokenizer

prepare_module = importlib.import_module("lmzoo.data.prepare")  # the attribute is the function
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def tokens(data_dir: Path, split: str) -> np.ndarray:
    meta = load_meta(data_dir)
    return np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])


def write_docs(folder: Path, n: int) -> list[str]:
    """``n`` small documents as doc000.txt...; returns their texts in order."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"document {i}: " + "abc xyz " * (i % 5 + 1) + "\n" for i in range(n)]
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return texts


def no_leftovers(out: Path) -> bool:
    return not any(p.name.startswith(".prepare-") for p in out.iterdir()) if out.exists() else True


# ---------------------------------------------------------------- single text


def test_tiny_shakespeare_char_matches_nanogpt(tmp_path: Path) -> None:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    out = prepare("shakespeare", tmp_path / "sc", input=SHAKESPEARE, progress=False)
    meta = load_meta(out)
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    assert meta["dtype"] == "uint16" and meta["eos_id"] is None and meta["split_rule"] == "contiguous"
    # nanoGPT data/shakespeare_char/prepare.py, step by step
    data = SHAKESPEARE.read_text(encoding="utf-8")
    stoi = {ch: i for i, ch in enumerate(sorted(set(data)))}
    n = len(data)
    train_ids = np.array([stoi[c] for c in data[: int(n * 0.9)]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in data[int(n * 0.9) :]], dtype=np.uint16)
    assert np.array_equal(tokens(out, "train"), train_ids) and np.array_equal(tokens(out, "val"), val_ids)
    assert meta["source_sha256"] == __import__("hashlib").sha256(SHAKESPEARE.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_single_text_split_is_contiguous(tmp_path: Path, kind: str) -> None:
    text = "".join(f"line {i}: the cat sat on the mat\n" for i in range(200))
    (tmp_path / "in.txt").write_text(text)
    out = prepare(
        tmp_path / "in.txt",
        tmp_path / "out",
        tokenizer=kind,
        vocab_size=300 if kind == "bpe" else None,
        val_fraction=0.25,
        progress=False,
    )
    tok = load_tokenizer(out / "tokenizer")
    cut = int(len(text) * 0.75)
    assert tok.decode(tokens(out, "train")) == text[:cut]
    assert tok.decode(tokens(out, "val")) == text[cut:]
    meta = load_meta(out)
    assert meta["tokenizer"] == kind and meta["val_fraction"] == 0.25 and meta["documents"] == 1


def test_big_single_text_is_read_in_pieces_with_the_same_result(tmp_path: Path, monkeypatch) -> None:
    text = "".join(f"ligne {i}: héhé — 東京 🙂\n" for i in range(3000))
    (tmp_path / "in.txt").write_text(text)
    whole = prepare(tmp_path / "in.txt", tmp_path / "whole", progress=False)
    monkeypatch.setattr(sources, "PIECE_BYTES", 1000)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 3000)
    pieces = list(iter_file_pieces(tmp_path / "in.txt", strict=True, piece_bytes=1000))
    assert len(pieces) > 50 and "".join(pieces) == text
    chunked = prepare(tmp_path / "in.txt", tmp_path / "chunked", progress=False)
    for split in ("train", "val"):
        assert np.array_equal(tokens(whole, split), tokens(chunked, split))


def test_bpe_ids_do_not_depend_on_where_a_big_file_is_cut(tmp_path: Path, monkeypatch) -> None:
    """Blank lines and trailing spaces: a cut inside a whitespace run would change the BPE pre-tokens
    (" \n" + "x" is not " " + "\n" + "x"), so pieces end only at a newline between two non-spaces."""
    lines = ["", "  ", "word  ", "\tindented", "end. "]
    text = "".join(f"{lines[i % 5]}{i}" + " " * (i % 2) + "\n" * (1 + i % 3) for i in range(4000))
    (tmp_path / "in.txt").write_text(text)
    whole = prepare(tmp_path / "in.txt", tmp_path / "whole", tokenizer="bpe", vocab_size=300, progress=False)
    monkeypatch.setattr(sources, "PIECE_BYTES", 500)
    pieces = list(iter_file_pieces(tmp_path / "in.txt", strict=True, piece_bytes=500))
    assert len(pieces) > 40 and "".join(pieces) == text
    assert all(p[-1] == "\n" and not p[-2].isspace() for p in pieces[:-1])
    chunked = prepare(tmp_path / "in.txt", tmp_path / "chunked", tokenizer="bpe", vocab_size=300, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(tokens(whole, split), tokens(chunked, split))


def test_invalid_utf8_offset_is_exact_across_pieces(tmp_path: Path) -> None:
    data = "é".encode() * 1500 + b"\xff" + b"tail"
    (tmp_path / "bad.txt").write_bytes(data)
    with pytest.raises(DataError, match=r"bad.txt: not valid UTF-8 at byte offset 3000 \(byte 0xff\)"):
        list(iter_file_pieces(tmp_path / "bad.txt", strict=True, piece_bytes=777))


def test_non_utf8_file_fails_for_char_but_roundtrips_for_byte(tmp_path: Path) -> None:
    data = b"hello \xff\xfe world\n" * 50
    (tmp_path / "bin.txt").write_bytes(data)
    with pytest.raises(DataError, match="byte offset 6 .*0xff.*char tokenizer"):
        prepare(tmp_path / "bin.txt", tmp_path / "c", tokenizer="char", progress=False)
    assert not (tmp_path / "c" / "meta.json").exists()
    for kind, vocab in (("byte", None), ("bpe", 300)):
        out = prepare(tmp_path / "bin.txt", tmp_path / kind, tokenizer=kind, vocab_size=vocab, progress=False)
        tok = load_tokenizer(out)
        joined = np.concatenate([tokens(out, "train"), tokens(out, "val")])
        assert tok.decode_bytes(joined) == data


# ---------------------------------------------------------------- documents


def test_folder_documents_are_sorted_split_by_rule_and_separated_by_eos(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "docs", 40)
    (tmp_path / "docs" / ".hidden.txt").write_text("never read")
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    out = prepare(tmp_path / "docs", tmp_path / "out", tokenizer="byte", progress=False)
    meta = load_meta(out)
    eos = meta["eos_id"]
    assert eos == 256 and meta["documents"] == 40 and meta["split_rule"] == "document-golden-ratio"
    want = {"train": [], "val": []}
    for i, text in enumerate(texts):
        want["val" if is_val_document(i, 0.1) else "train"].append(list(text.encode()) + [eos])
    for split in ("train", "val"):
        assert tokens(out, split).tolist() == [t for doc in want[split] for t in doc]
    assert meta["val_documents"] == len(want["val"]) == 4


def test_char_tokenizer_gets_eos_for_documents(tmp_path: Path) -> None:
    write_docs(tmp_path / "docs", 20)
    out = prepare(tmp_path / "docs", tmp_path / "out", tokenizer="char", progress=False)
    tok = load_tokenizer(out)
    assert tok.special_tokens == {EOT: tok.vocab_size - 1} == {EOT: load_meta(out)["eos_id"]}


def test_is_val_document_spreads_val_evenly() -> None:
    for fraction in (0.05, 0.1, 0.3):
        flags = [is_val_document(i, fraction) for i in range(2000)]
        for start in (0, 500, 1000):  # any window holds about fraction of it
            assert abs(sum(flags[start : start + 1000]) - 1000 * fraction) <= 3
    assert not any(is_val_document(i, 0.0) for i in range(1000))


def test_prepare_is_deterministic(tmp_path: Path) -> None:
    write_docs(tmp_path / "docs", 30)
    a = prepare(tmp_path / "docs", tmp_path / "a", tokenizer="bpe", vocab_size=280, progress=False)
    b = prepare(tmp_path / "docs", tmp_path / "b", tokenizer="bpe", vocab_size=280, progress=False)
    for name in ("train.bin", "val.bin", "tokenizer/tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert load_meta(a)["source_sha256"] == load_meta(b)["source_sha256"]


def test_parallel_workers_give_the_same_files(tmp_path: Path, monkeypatch) -> None:
    write_docs(tmp_path / "docs", 60)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 200)  # many chunks, so order matters
    serial = prepare(tmp_path / "docs", tmp_path / "serial", tokenizer="byte", workers=1, progress=False)
    parallel = prepare(tmp_path / "docs", tmp_path / "parallel", tokenizer="byte", workers=2, progress=False)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (serial / name).read_bytes() == (parallel / name).read_bytes()


def test_jsonl_and_parquet_records(tmp_path: Path) -> None:
    rows = [{"id": i, "body": f"record number {i} " * 3} for i in range(30)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = prepare(tmp_path / "r.jsonl", tmp_path / "j", tokenizer="byte", text_field="body", progress=False)
    assert load_meta(out)["documents"] == 30
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"body": [r["body"] for r in rows]}), tmp_path / "r.parquet")
    out2 = prepare(
        tmp_path / "r.parquet", tmp_path / "p", tokenizer="byte", text_field="body", progress=False
    )
    assert (out / "train.bin").read_bytes() == (out2 / "train.bin").read_bytes()
    with pytest.raises(DataError, match=r"no column 'bodi' \(columns: body\).*did you mean: body"):
        prepare(tmp_path / "r.parquet", tmp_path / "p2", tokenizer="byte", text_field="bodi", progress=False)


def test_jsonl_missing_field_names_the_line_and_leaves_no_meta(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"ok {i}"}) for i in range(5)] + [json.dumps({"txt": "oops"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=r"bad.jsonl:6: no field 'text' \(fields: txt\) \(did you mean: txt\?\)"
    ):
        prepare(tmp_path / "bad.jsonl", out, tokenizer="byte", progress=False)
    assert not (out / "meta.json").exists() and no_leftovers(out)
    (tmp_path / "bad2.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="bad2.jsonl:2: not valid JSON"):
        prepare(tmp_path / "bad2.jsonl", out, tokenizer="byte", progress=False)


def test_saved_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i} says hello" for i in range(25)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    out = prepare(tmp_path / "ds", tmp_path / "out", tokenizer="byte", progress=False)
    meta = load_meta(out)
    assert meta["documents"] == 25 and meta["source"].startswith("saved data set")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="no split 'tran'.*did you mean: train"):
        open_source(tmp_path / "dd", split="tran")
    assert list(open_source(tmp_path / "dd").texts()) == texts


def test_hub_dataset_offline_is_one_line(monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (OfflineModeIsEnabled)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match="could not open hub data set 'someone/corpus'.*Couldn't reach"
    ) as info:
        open_source("someone/corpus")
    assert "\n" not in str(info.value)


def test_stdlib_builtin_with_limit(tmp_path: Path) -> None:
    src = open_source("stdlib", limit=5)
    docs = list(src.texts())
    assert len(docs) == 5 and "stdlib" in src.description
    assert docs == list(open_source("stdlib", limit=5).texts())  # deterministic order
    out = prepare("stdlib", tmp_path / "s", tokenizer="byte", limit=40, val_fraction=0.1, progress=False)
    assert load_meta(out)["documents"] <= 40 and load_meta(out)["val_tokens"] > 0


def test_shakespeare_offline_without_input_says_how_to_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(DataError, match="could not download tiny Shakespeare.*input=PATH"):
        open_source("shakespeare")
    (tmp_path / "local.txt").write_text("First Citizen:\nSpeak.\n")
    assert (
        "".join(open_source("shakespeare", input=tmp_path / "local.txt").texts())
        == "First Citizen:\nSpeak.\n"
    )
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tinyshakespeare.txt").write_text("cached copy\n")
    assert "".join(open_source("shakespeare").texts()) == "cached copy\n"


# ---------------------------------------------------------------- errors and atomicity


def test_bad_sources_are_one_line_data_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nofiles").mkdir()
    (tmp_path / "nofiles" / "x.bin").write_bytes(b"\0")
    cases = [
        (tmp_path / "missing.txt", "no such file or folder"),
        (tmp_path / "empty.txt", "is empty"),
        (tmp_path / "nofiles", "has no text files"),
        ("shakespear", r"unknown source 'shakespear'.*did you mean: shakespeare"),
        (str(tmp_path / "*.md"), "matches no files"),
    ]
    for source, match in cases:
        with pytest.raises(DataError, match=match) as info:
            prepare(source, tmp_path / "out", tokenizer="byte", progress=False)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_settings(tmp_path: Path) -> None:
    write_docs(tmp_path / "docs", 3)
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        prepare(tmp_path / "docs", tmp_path / "out", tokenizer="bpe", vocab_size=100, progress=False)
    with pytest.raises(DataError, match="val split is empty"):
        prepare(tmp_path / "docs", tmp_path / "out", tokenizer="byte", progress=False)
    with pytest.raises(ConfigError, match="did you mean: byte"):
        prepare(tmp_path / "docs", tmp_path / "out", tokenizer="bytes", progress=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(tmp_path / "docs", tmp_path / "out", val_fraction=1.0, progress=False)
    assert not (tmp_path / "out" / "meta.json").exists() and no_leftovers(tmp_path / "out")


def test_failure_midway_keeps_the_old_dataset_and_writes_no_meta(tmp_path: Path, monkeypatch) -> None:
    write_docs(tmp_path / "docs", 30)
    out = prepare(tmp_path / "docs", tmp_path / "out", tokenizer="byte", progress=False)
    old = {p.name: p.read_bytes() for p in out.glob("*.*")}
    (out / "meta.json").unlink()  # now a fresh directory holding only stray files
    calls = {"n": 0}
    real = prepare_module._encode_chunk

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed while writing
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 100)
    monkeypatch.setattr(prepare_module, "_encode_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "docs", out, tokenizer="byte", workers=1, progress=False)
    assert not (out / "meta.json").exists() and no_leftovers(out)
    assert (out / "train.bin").read_bytes() == old["train.bin"]
    with pytest.raises(DataError, match="not a prepared data set"):
        load_meta(out)


def test_load_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data directory"):
        load_meta(tmp_path / "nope")
    write_docs(tmp_path / "docs", 30)
    out = prepare(tmp_path / "docs", tmp_path / "out", tokenizer="byte", progress=False)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train.bin: 10 bytes where meta.json says"):
        load_meta(out)


def test_token_dtype() -> None:
    assert token_dtype(65536) is np.uint16 and token_dtype(65537) is np.uint32


# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> Path:
    """A prepared data set whose train tokens are 0, 1, 2, ... (mod 256) so positions are readable."""
    d = tmp_path_factory.mktemp("counting")
    (d / "in.txt").write_bytes(bytes(i % 256 for i in range(5000)))
    return prepare(d / "in.txt", d / "out", tokenizer="byte", val_fraction=0.2, progress=False)


def test_loader_shapes_and_shift(counting: Path) -> None:
    loader = TokenLoader(counting, "train", block_size=16, batch_size=4)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, 0] + 16) % 256, y[:, -1])  # consecutive tokens of the file


def test_loader_random_is_a_pure_function_of_seed_rank_step(counting: Path) -> None:
    a = TokenLoader(counting, "train", 8, 4, seed=1)
    b = TokenLoader(counting, "train", 8, 4, seed=1)
    batches = [a.next_batch()[0] for _ in range(5)]
    assert torch.equal(b.batch_at(3)[0], batches[3])
    assert not torch.equal(TokenLoader(counting, "train", 8, 4, seed=2).batch_at(0)[0], batches[0])
    other_rank = TokenLoader(counting, "train", 8, 4, seed=1, rank=1, world_size=2)
    assert not torch.equal(other_rank.batch_at(0)[0], batches[0])


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_loader_resume_equals_uninterrupted(counting: Path, mode: str) -> None:
    straight = TokenLoader(counting, "train", 8, 3, seed=5, mode=mode)
    expected = [straight.next_batch() for _ in range(10)]
    first = TokenLoader(counting, "train", 8, 3, seed=5, mode=mode)
    for _ in range(4):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TokenLoader(counting, "train", 8, 3, seed=0, mode=mode)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((next(iter(resumed)) for _ in range(6)), expected[4:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_loader_state_from_another_setting_is_rejected(counting: Path) -> None:
    state = TokenLoader(counting, "train", 8, 3).state_dict()
    with pytest.raises(ConfigError, match="block_size=8"):
        TokenLoader(counting, "train", 16, 3).load_state_dict(state)


def test_sequential_ranks_are_disjoint_and_cover_the_split(counting: Path) -> None:
    block, batch, world = 10, 4, 3
    loaders = [
        TokenLoader(counting, "train", block, batch, mode="sequential", rank=r, world_size=world)
        for r in range(world)
    ]
    n_windows = loaders[0].num_windows
    assert n_windows == (4000 - 1) // block
    data = np.fromfile(counting / "train.bin", dtype=np.uint16).astype(np.int64)
    seen: list[int] = []
    steps = -(-n_windows // (batch * world))
    for step in range(steps):
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            for row in range(batch):
                start = ((step * world + r) * batch + row) % n_windows * block
                assert x[row].tolist() == data[start : start + block].tolist()
                assert y[row].tolist() == data[start + 1 : start + block + 1].tolist()
                seen.append(start)
    first_epoch = seen[:n_windows]
    assert sorted(first_epoch) == list(range(0, n_windows * block, block))  # each window once, in order
    assert seen[n_windows] == 0  # then it wraps around


def test_loader_errors(counting: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"block_size 1000 is larger than the val split minus one \(1000 tokens"
    ):
        TokenLoader(counting, "val", block_size=1000, batch_size=2)
    TokenLoader(counting, "val", block_size=999, batch_size=2).next_batch()
    with pytest.raises(ConfigError, match="did you mean: val"):
        TokenLoader(counting, "vall", 8, 2)
    with pytest.raises(ConfigError, match="did you mean: sequential"):
        TokenLoader(counting, "train", 8, 2, mode="sequentail")
    with pytest.raises(DataError, match="not a prepared data set"):
        TokenLoader(tmp_path, "train", 8, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_cuda_batches_match_cpu(counting: Path) -> None:
    cpu = TokenLoader(counting, "train", 8, 4, seed=3).next_batch()
    gpu = TokenLoader(counting, "train", 8, 4, seed=3, device="cuda").next_batch()
    assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
