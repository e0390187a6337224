"""Fuzzing the files of checkpoint and data directories: whatever ``config.json``, ``LATEST``, ``meta.json``,
the safetensors header or ``train_state.pt`` hold, the command that reads them ends as a run or as one line
``lmzoo: error: ...`` with exit code 2, never a traceback (docs/reliability.md, section 4).

Each case starts from a real file, made by lmzoo, and replaces it (or a field of it) with values drawn by
hypothesis: junk of every JSON type, nested values, huge numbers, random bytes. The commands run in-process;
the training loop is replaced by a sink (:class:`Reached`) so that ``lmzoo train --resume`` stops once every
file is read and restored. Examples are few per file (the suite stays fast) and new each run (tests/_fuzz.py).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lmzoo  # noqa: E402
from _fuzz import fuzz  # noqa: E402
from lmzoo.cli.app import main  # noqa: E402
from lmzoo.formats import checkpoint as ckpt  # noqa: E402
from lmzoo.models import build  # noqa: E402
from lmzoo.tokenizer import ByteTokenizer  # noqa: E402


class Reached(BaseException):  # noqa: N818 - not an error: every file was read and the loop would start
    """Raised instead of the training loop."""


def _sink(*args, **kwargs):
    raise Reached


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A checkpoint, a prepared data set and a run directory with a training checkpoint (made by a real
    Trainer), and the training loop replaced by the sink."""
    from lmzoo.data.prepare import prepare
    from lmzoo.train import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("fuzz-files")
    lmzoo.save(build("gpt2-debug", vocab_size=257), root / "ckpt", tokenizer=ByteTokenizer())
    (root / "corpus.txt").write_text("the cat says meow, the dog says woof. " * 80)
    data = prepare(str(root / "corpus.txt"), root / "data", tokenizer="byte", progress=False)
    cfg = TrainConfig(model="gpt2-debug", model_args={"block_size": 16}, data_dir=str(data), out_dir=str(root / "run"),
                      batch_size=2, block_size=16, max_steps=4, eval_iters=1, progress=False, sample_tokens=0,
                      device="cpu")
    trainer = Trainer(cfg)
    trainer.save_checkpoint()  # ckpt-00000000 with its train_state.pt, and LATEST
    (root / "run" / "train_config.json").write_text(json.dumps(trainer.cfg.to_dict()))
    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "train", _sink)
    yield root
    mp.undo()


def check(argv: list) -> str:
    """Run ``lmzoo argv`` in-process: a run, or exactly one error line with exit code 2."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in argv])
    except Reached:
        return "run"
    except Exception:  # a traceback: the failure this file looks for
        raise AssertionError(f"{argv}: {traceback.format_exc()}") from None
    if code == 0:
        return "ok"
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmzoo: error: "), (argv, code, err.getvalue())
    return "error"


class replaced:
    """Within the block, ``path`` holds ``data``; then its own bytes again."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data

    def __enter__(self):
        self.saved = self.path.read_bytes()
        self.path.write_bytes(self.data)

    def __exit__(self, *exc):
        self.path.write_bytes(self.saved)


# -- strategies ------------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**63, 10**400]),
                    st.floats(allow_nan=True), st.text(max_size=12), st.sampled_from(["", "uint16", "int8", "F32",
                                                                                      "gpt2", "..", "/"]))


def _json_containers(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3))


json_values = st.recursive(scalars, _json_containers, max_leaves=8)
raw_bytes = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b"[" * 5000, b'{"a": ' * 3000,
                                                               b"\xff\xfe", b"1" * 5000, b"null"]))


def _dump(value) -> bytes:
    return json.dumps(value, allow_nan=True, default=str).encode()


def mutated_json(original: dict):
    """The original object with fields replaced, added or deleted; another JSON value; or raw bytes."""
    keys = sorted(original)
    edits = st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)), json_values, max_size=3)
    changed = st.builds(lambda e, drop: _dump({**{k: v for k, v in original.items() if k not in drop}, **e}),
                        edits, st.sets(st.sampled_from(keys), max_size=2))
    return st.one_of(changed, json_values.map(_dump), raw_bytes)


# -- the fuzzers -----------------------------------------------------------------------------------------


def fuzz_json_file(data, f: Path, *commands: list) -> None:
    """Replace JSON file ``f`` by a draw of :func:`mutated_json` and check each command that reads it."""
    with replaced(f, data.draw(mutated_json(json.loads(f.read_text())))):
        for argv in commands:
            check(argv)


@fuzz(20)
@given(data=st.data())
def test_random_config_json_never_gives_a_traceback(dirs, data):
    fuzz_json_file(data, dirs / "ckpt" / "config.json", ["info", "--checkpoint", dirs / "ckpt"],
                   ["generate", "--checkpoint", dirs / "ckpt", "--max-new-tokens", 2, "--device", "cpu"])


@fuzz(20)
@given(content=st.one_of(raw_bytes, st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
                         st.sampled_from([b"ckpt-00000000", b"../ckpt", b"/etc", b"ckpt-00000000/..", b".", b"",
                                          b"ckpt-99999999", b"ckpt-00000000\x00x", "ckpt-\u00e9".encode()])))
def test_random_latest_never_gives_a_traceback(dirs, content):
    with replaced(dirs / "run" / "LATEST", content):
        check(["generate", "--checkpoint", dirs / "run", "--max-new-tokens", 2, "--device", "cpu"])


@fuzz(20)
@given(data=st.data())
def test_random_meta_json_never_gives_a_traceback(dirs, data):
    fuzz_json_file(data, dirs / "data" / "meta.json",
                   ["eval", "--checkpoint", dirs / "ckpt", "--data-dir", dirs / "data", "--device", "cpu"])


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@fuzz(20)
@given(data=st.data())
def test_random_safetensors_header_never_gives_a_traceback(dirs, data):
    """The header is JSON of tensor name -> {dtype, shape, data_offsets}, after its length in 8 bytes."""
    f = dirs / "ckpt" / "model.safetensors"
    header, body = _header(f)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = data.draw(st.one_of(
        st.builds(lambda e: {**header[name], **e}, st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
            st.one_of(json_values, st.lists(st.integers(-2, 2**66), max_size=3)), max_size=2)),
        json_values))
    new = _dump({**header, name: entry})
    length = data.draw(st.one_of(st.just(len(new)), st.integers(0, 2**64 - 1)))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(body))))
    with replaced(f, struct.pack("<Q", length) + new + body[:cut]):
        check(["generate", "--checkpoint", dirs / "ckpt", "--max-new-tokens", 2, "--device", "cpu"])


# values torch.load(weights_only=True) gives back: plain containers, numbers, strings and tensors
def _state_containers(inner):
    keys = st.one_of(st.text(max_size=6), st.integers(0, 3))
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3))


state_values = st.recursive(
    st.one_of(scalars, st.builds(torch.zeros, st.lists(st.integers(0, 3), max_size=2)),
              st.sampled_from([torch.zeros((), dtype=torch.uint8), torch.ones(624, dtype=torch.int64)])),
    _state_containers, max_leaves=6)


@fuzz(20)
@given(data=st.data())
def test_random_train_state_never_gives_a_traceback(dirs, data):
    """``lmzoo train --resume`` reads every entry of the train state (optimizer, scaler, loader, RNG states,
    counters) before the loop starts: an entry replaced or deleted, at the top or one level down."""
    f = ckpt.resolve(dirs / "run") / ckpt.TRAIN_STATE
    good = torch.load(f, weights_only=True)
    key = data.draw(st.sampled_from(sorted(good)))
    how = data.draw(st.sampled_from(["replace", "delete", "inner"]))
    bad = dict(good)
    if how == "delete":
        del bad[key]
    elif how == "inner" and isinstance(good[key], dict) and good[key]:
        inner = data.draw(st.sampled_from(sorted(good[key], key=str)))
        bad[key] = {**good[key], inner: data.draw(state_values)}
    else:
        bad[key] = data.draw(state_values)
    buf = io.BytesIO()
    torch.save(bad if data.draw(st.booleans()) else data.draw(state_values), buf)
    with replaced(f, buf.getvalue()):
        check(["train", "--resume", f"--out_dir={dirs / 'run'}", "--max_steps=8", "--device=cpu"])


def test_the_fuzzed_files_are_read_for_real(dirs):
    """The fuzzers are not vacuous: with the files as lmzoo wrote them, each command gets past reading them."""
    assert check(["generate", "--checkpoint", dirs / "run", "--max-new-tokens", 2, "--device", "cpu"]) == "ok"
    assert check(["eval", "--checkpoint", dirs / "ckpt", "--data-dir", dirs / "data", "--device", "cpu"]) == "ok"
    assert check(["train", "--resume", f"--out_dir={dirs / 'run'}", "--max_steps=8", "--device=cpu"]) == "run"
    copy = dirs / "copy"
    shutil.copytree(dirs / "ckpt", copy)
    (copy / "config.json").write_text("{")
    assert check(["info", "--checkpoint", copy]) == "error"
    assert sys.getrecursionlimit() >= 1000  # the deep-nesting cases meet Python's real limit
