"""benchmarks/cpu_shakespeare_char.py: lmzoo alone, and side by side with a nanoGPT checkout.

The side-by-side path runs against a stand-in checkout (the files the benchmark uses, written here:
a prepare.py that refuses to download and a train.py that checks its command line and prints nanoGPT's
evaluation lines), so it is tested without nanoGPT's code; the real comparison is the benchmark's job.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_shakespeare_char.py"

PREPARE = '''
import os, pathlib
here = pathlib.Path(__file__).parent
assert (here / "input.txt").is_file(), "would download"
text = (here / "input.txt").read_text()
(here / "train.bin").write_bytes(text[: int(len(text) * 0.9)].encode())
(here / "val.bin").write_bytes(text[int(len(text) * 0.9):].encode())
'''

TRAIN = '''
import pathlib, sys, time
args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[2:])
assert sys.argv[1] == "config/train_shakespeare_char.py" and args["device"] == "cpu" and args["compile"] == "False"
assert args["block_size"] == "64" and args["batch_size"] == "12" and args["n_embd"] == "128"
assert args["max_iters"] == args["lr_decay_iters"]
assert (pathlib.Path("data/shakespeare_char") / "train.bin").is_file()
with open("../order.log", "a") as f:
    f.write("nanogpt\\n")
time.sleep(0.2)
n = int(args["max_iters"])
print(f"step 0: train loss 4.2000, val loss 4.2100")
print(f"step {n}: train loss 2.5000, val loss 2.6543")
'''


def _fake_nanogpt(root: Path) -> Path:
    d = root / "nanoGPT"
    (d / "config").mkdir(parents=True)
    (d / "data" / "shakespeare_char").mkdir(parents=True)
    (d / "config" / "train_shakespeare_char.py").write_text("# the recipe's config\n")
    (d / "data" / "shakespeare_char" / "prepare.py").write_text(PREPARE)
    (d / "train.py").write_text(TRAIN)
    (d / "model.py").write_text("# the model, which the stand-in train.py does not need\n")
    (d / "configurator.py").write_text("# the command-line overrides, parsed by the stand-in itself\n")
    return d


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def test_without_nanogpt_it_says_so_and_trains_lmzoo_alone(prepare_text, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("".join(f"line {i}: to be or not to be.\n" for i in range(400)))
    res = _run("--input", str(text), "--max-steps", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "no --nanogpt DIR given: running lmzoo alone" in res.stderr
    (line,) = res.stdout.strip().splitlines()
    rec = json.loads(line)
    assert rec["system"] == "lmzoo" and rec["steps"] == 3 and rec["wall_s"] > 0 and rec["val_loss"] > 0
    assert rec["val_loss_200"] > 0 and rec["params"] > 0


def test_side_by_side_interleaves_both_systems_on_the_same_text(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("".join(f"line {i}: to be or not to be.\n" for i in range(400)))
    nanogpt = _fake_nanogpt(tmp_path)
    before = sorted(p.relative_to(nanogpt) for p in nanogpt.rglob("*"))
    res = _run("--input", str(text), "--nanogpt", str(nanogpt), "--max-steps", "3", "--rounds", "2",
               "--work", str(tmp_path / "work"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [r.get("system") for r in recs[:-1]] == ["nanogpt", "lmzoo", "nanogpt", "lmzoo"]  # A B A B
    for r in recs[:-1]:
        assert r["wall_s"] > 0 and r["steps"] == 3
    assert [r["val_loss"] for r in recs[:-1:2]] == [2.6543, 2.6543]  # parsed from nanoGPT's last eval line
    summary = recs[-1]
    assert summary["nanogpt_wall_s"] == [recs[0]["wall_s"], recs[2]["wall_s"]]
    assert summary["lmzoo_val_loss"] == [recs[1]["val_loss"], recs[3]["val_loss"]]
    ratio = summary["lmzoo_wall_median_s"] / summary["nanogpt_wall_median_s"]
    assert abs(summary["wall_ratio_lmzoo_over_nanogpt"] - ratio) < 1e-3
    # which nanoGPT code ran is on record even without git: the hash of each file
    hashes = summary["nanogpt_files_sha256"]
    assert hashes["train.py"] == hashlib.sha256((nanogpt / "train.py").read_bytes()).hexdigest()
    assert len(hashes) == 5 and len(set(hashes.values())) == 5
    # nanoGPT read the same text, copied in (never downloaded), and the user's checkout was left as it was
    copied = tmp_path / "work" / "nanogpt" / "data" / "shakespeare_char" / "input.txt"
    assert copied.read_text() == text.read_text()
    assert sorted(p.relative_to(nanogpt) for p in nanogpt.rglob("*")) == before


def test_a_directory_that_is_not_nanogpt_is_refused_in_one_line(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("abc\n" * 100)
    res = _run("--input", str(text), "--nanogpt", str(tmp_path), cwd=tmp_path)
    assert res.returncode != 0 and "is not a nanoGPT checkout" in res.stderr and "Traceback" not in res.stderr
