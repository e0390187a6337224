"""lmzoo eval: bits per byte, perplexity, multiple-choice scoring (docs/evaluation.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmzoo
from _tiny_run import SENTENCES, tiny_run
from lmzoo.cli.app import main
from lmzoo.errors import DataError
from lmzoo.evaluation.evaluate import evaluate_choices, evaluate_split, evaluate_text, read_choices, sequence_nll
from lmzoo.formats.checkpoint import load_tokenizer_of


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def test_bits_per_byte_of_a_byte_level_model_is_loss_over_ln2(run):
    model, tok = lmzoo.load(run), load_tokenizer_of(run)
    text = "the dog says woof. héllo, wörld! " * 5  # multi-byte characters: still one token per byte
    r = evaluate_text(model, tok, text, block_size=16)
    assert r.tokens == len(text.encode("utf-8")) - 1 == r.bytes
    assert r.bits_per_byte == pytest.approx(r.loss / math.log(2), rel=1e-9)
    assert r.perplexity == pytest.approx(math.exp(r.loss))


def test_windowed_nll_equals_the_sum_over_windows(run):
    model, tok = lmzoo.load(run), load_tokenizer_of(run)
    ids = tok.encode(SENTENCES * 3)
    total, n = sequence_nll(model, ids, block_size=16, batch_size=3)
    parts = [sequence_nll(model, ids[i : i + 17], block_size=16)[0] for i in range(0, len(ids) - 1, 16)]
    assert n == len(ids) - 1
    assert total == pytest.approx(sum(parts), rel=1e-5)


def test_evaluation_builds_no_autograd_graph(run):
    model, tok = lmzoo.load(run), load_tokenizer_of(run)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), out.logits.requires_grad)))
    sequence_nll(model, tok.encode(SENTENCES), block_size=16)
    assert seen and all(s == (False, False) for s in seen)


def test_split_evaluation_reads_the_prepared_val_tokens(run):
    r = evaluate_split(lmzoo.load(run), run.parent / "data", "val")
    assert r.loss < 1.0  # it learned the sentences by heart (uniform over 257 bytes would be 5.5)
    assert r.bytes == r.tokens


def test_multiple_choice_picks_the_answer_the_model_was_trained_to_prefer(run, tmp_path):
    task = tmp_path / "animals.jsonl"
    rows = [  # HellaSwag's field names; the endings lack the leading space, as in HellaSwag
        {"ctx": "the cat says", "endings": ["woof.", "meow.", "moo."], "label": 1},
        {"ctx": "the dog says", "endings": ["woof.", "meow.", "moo."], "label": "0"},
        {"context": "the cow says", "choices": [" meow.", " woof.", " moo."], "label": 2},
    ]
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = evaluate_choices(lmzoo.load(run), load_tokenizer_of(run), task)
    assert res["examples"] == 3 and res["acc"] == 1.0 and res["acc_norm"] == 1.0
    assert [p["pred"] for p in res["predictions"]] == [1, 0, 2]


def test_bad_task_files_are_one_line_errors(tmp_path, capsys, run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b"], "label": 3}\n')
    with pytest.raises(DataError, match="label 3"):
        read_choices(bad)
    assert main(["eval", "--checkpoint", str(run), "--task", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmzoo: error:") and err.count("\n") == 1


def test_eval_cli_prints_json(run, capsys):
    text = run.parent / "animals.txt"
    assert main(["eval", "--checkpoint", str(run), "--text", str(text), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out[str(text)]
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2))
