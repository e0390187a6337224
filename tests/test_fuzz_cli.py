"""CLI and config fuzzing: random argv and YAML never give a traceback.

``lmzoo.cli.app.main`` runs in-process on argument lists and ``--config`` YAML documents drawn by
hypothesis. Each case must end as a run or as one line ``lmzoo: error: ...`` with exit code 2.
Nothing long may start: the points where real work begins (data preparation, the training loop,
decoding past a few tokens, the HTTP server, the chat loop, sweeps, benchmarks, subprocesses) are
replaced by a sink that raises :class:`Reached`, which counts as "a run". Everything before those
points, i.e. all parsing and validation, runs for real.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import traceback
from contextlib import redirect_stderr, redirect_stdout

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lmzoo  # noqa: E402
from _fuzz import fuzz  # noqa: E402
from lmzoo.cli.app import build_parser, main  # noqa: E402
from lmzoo.models import build  # noqa: E402
from lmzoo.tokenizer import ByteTokenizer  # noqa: E402
from lmzoo.train.config import TrainConfig  # noqa: E402


class Reached(BaseException):  # noqa: N818 - not an error: the case got past validation
    """Raised by a sink: validation passed and real work would start here."""


def _sink(*args, **kwargs):
    raise Reached


def _short_stream(real):
    def stream(*args, **kwargs):  # decode for real, but a few tokens only
        for i, t in enumerate(real(*args, **kwargs)):
            yield t
            if i >= 2:
                raise Reached

    return stream


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory with one valid tiny checkpoint (so deeper paths are reached), and the sinks."""
    root = tmp_path_factory.mktemp("fuzz")
    lmzoo.save(build("gpt2-debug", vocab_size=257), root / "ckpt", tokenizer=ByteTokenizer())
    (root / "text.txt").write_text("the cat says meow. " * 20)
    mp = pytest.MonkeyPatch()
    m = {n.rpartition(".")[2]: importlib.import_module(f"lmzoo.{n}") for n in (
        "evaluation.bench", "serving.chat", "evaluation.compare", "data", "decoding.generate", "evaluation.scaling",
        "train")}
    for mod, name in [(m["data"], "prepare"), (m["train"].Trainer, "train"), (m["chat"], "run_chat"),
                      (m["compare"], "compare"), (m["scaling"], "run_sweep"), (m["bench"], "bench_train"),
                      (m["bench"], "bench_generate"), (subprocess, "run"), (subprocess, "Popen")]:
        mp.setattr(mod, name, _sink)
    mp.setattr(m["generate"], "stream", _short_stream(m["generate"].stream))
    try:
        import uvicorn

        mp.setattr(uvicorn, "run", _sink)
    except ImportError:
        pass
    mp.chdir(root)
    yield root
    mp.undo()


def check(argv: list[str]) -> str:
    """Run ``lmzoo argv``; assert it is a run or a one-line error with exit code 2."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    except Reached:
        if os.environ.get("FUZZ_DEBUG"):  # where the run was stopped
            traceback.print_exc()
        return "run"
    except SystemExit as e:  # argparse's --help
        code = e.code
    if code in (0, None):
        return "ok"
    msg = err.getvalue()
    if code == 2 and not msg and out.getvalue().startswith("usage:"):  # bare `lmzoo`: the help
        return "help"
    lines = msg.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmzoo: error: "), (argv, code, msg)
    return "error"


# -- strategies -----------------------------------------------------------------------------------

_sub = build_parser()._subparsers._group_actions[0].choices  # name -> subparser
SUBCOMMANDS = sorted(_sub)
FLAGS = sorted({o for p in _sub.values() for a in p._actions for o in a.option_strings if o.startswith("--")})
KEYS = TrainConfig.field_names() + ["model.n_layer", "model_args.n_embd", "model.vocab_size", "parallel.mode",
                                    "optimizer_args.scaling", "n_layer", "nonsense", "model.nonsense"]
JUNK = ["", "-1", "0", "1", "2", "3", "-0", "1e9", "1e400", "nan", "inf", "-inf", "0.5", "[1, 2]", "{a: 1}",
        "null", "true", "no", "gpt2-debug", "gpt2", "llama-debug", "jamba-debug", "mamba-debug", "ckpt",
        "ckpt/model.safetensors", "text.txt", "missing/dir", ".", "/", "x" * 300, "\udcff", "é", "--", "-",
        "=", "a=b", "cuda", "cpu", "mps", "byte", "char", "bpe", "lora", "qlora", "full", "raw", "steps=2", "steps=x",
        "9223372036854775808", "-9223372036854775809"]
values = st.one_of(st.sampled_from(JUNK), st.text(st.characters(blacklist_characters="\x00"), max_size=8),
                   st.integers(-3, 40).map(str))
override = st.builds(lambda k, v: f"--{k}={v}", st.sampled_from(KEYS), values)
flag_value = st.builds(lambda f, v: [f, v], st.sampled_from(FLAGS), values)
token = st.one_of(override, flag_value.map(tuple), st.sampled_from(FLAGS), values)


@st.composite
def argvs(draw):
    head = draw(st.one_of(st.sampled_from(SUBCOMMANDS).map(lambda s: [s]), st.just(["bench", "train"]),
                          st.just(["bench", "generate"]), st.lists(values, max_size=1)))
    argv = list(head)
    for t in draw(st.lists(token, max_size=6)):
        argv.extend(t if isinstance(t, tuple) else [t])
    return argv


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=10), st.sampled_from(JUNK))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
yaml_docs = st.one_of(
    st.dictionaries(st.sampled_from(KEYS + ["model_args"]), yaml_values, max_size=6),
    st.dictionaries(st.sampled_from(["model_args", "parallel", "optimizer_args"]),
                    st.dictionaries(st.sampled_from(["n_layer", "n_embd", "n_head", "vocab_size", "mode", "x"]),
                                    scalars, max_size=4), max_size=3),
    yaml_values,
)



@fuzz(80)
@given(argv=argvs())
def test_random_argv_never_gives_a_traceback(sandbox, argv):
    check(argv)


@fuzz(60)
@given(doc=yaml_docs, raw=st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=40)), extra=st.lists(
    override, max_size=2))
def test_random_yaml_config_never_gives_a_traceback(sandbox, doc, raw, extra):
    f = sandbox / "recipe.yaml"
    if raw is None:
        f.write_text(yaml.safe_dump(doc, allow_unicode=True))
    else:
        f.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape"))
    for sub in (["train"], ["finetune", "ckpt"]):
        check([*sub, "--config", str(f), "--device=cpu", *extra])


@pytest.mark.parametrize("argv", [
    ["train", "--max_steps=1e400"], ["train", "--model_args={a: [1]}"], ["train", "--model.n_layer=1e9"],
    ["info", "gpt2-debug", "--n_layer=-1"], ["generate", "--checkpoint", "ckpt", "--max-new-tokens", "-1"],
    ["generate", "--checkpoint", "ckpt", "--top-p", "nan"], ["eval", "--checkpoint", "ckpt", "--text", "\udcff"],
    ["serve", "--checkpoint", "ckpt", "--port", "-1"],
    ["report", "bpe", ""], ["plot", "x" * 300], ["report", "a\x85\rb"], ["train", "--model_args=0"],
    ["train", "--parallel.mode=0"], ["compare", "--budget", "steps=abc", "--run", "a:gpt2-debug"],
    ["compare", "--budget", "flops=.nan", "--run", "a:gpt2-debug"], ["train", "--model_args=--"],
])
def test_known_hard_cases(sandbox, argv):
    """Cases the fuzzer found (each once a traceback or a two-line error), kept as plain regression tests."""
    assert check(argv) == "error"


@pytest.mark.parametrize("doc", ["model_args: [1]", "model_args: 3.5", "parallel: {mode: 0}", "parallel: null",
                                 "optimizer: 7", "- a\n- b", "max_steps: .nan", "{", "\xff"])
def test_known_hard_yaml(sandbox, doc):
    (sandbox / "hard.yaml").write_text(doc, encoding="utf-8", errors="surrogateescape")
    assert check(["train", "--config", "hard.yaml", "--device=cpu"]) == "error"
