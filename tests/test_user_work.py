"""A user's own work is never overwritten or misread, through the real command line (a subprocess each):
run directories belong to their run, data paths mean what they say, resume restores the run, one option
convention, files written only where asked, exit codes scripts can trust, bench and eval people can read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the cat says meow. the dog says woof. the cow says moo.\n" * 300
# a tiny run: seconds on one CPU thread
TINY = ["--model", "gpt2-debug", "--tokenizer", "byte", "--block_size", "16", "--batch_size", "2",
        "--eval_iters", "1", "--eval_interval", "2", "--sample_tokens", "0", "--progress", "false", "--device", "cpu",
        "--threads", "1", "--warmup_steps", "1"]


def lmzoo(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LMZOO_SMOKE", None)
    return subprocess.run([sys.executable, "-m", "lmzoo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a usage error (exit 2), checked to name every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("lmzoo: error: "), r.stderr
    assert "Traceback" not in r.stderr and all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``lmzoo ARGS`` in this process (cheaper than a subprocess where the acceptance needs none)."""
    from lmzoo.cli.app import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (links as their target) with the SHA-256 of its bytes."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(directory))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A workspace (the cwd of the commands) with my.txt and one finished default run, runs/latest."""
    home = tmp_path_factory.mktemp("home")
    (home / "my.txt").write_text(TEXT)
    r = lmzoo("train", "--source", "my.txt", "--max_steps", "2", *TINY, cwd=home)
    assert r.returncode == 0, r.stderr
    return home


@pytest.fixture
def home(base, tmp_path) -> Path:
    """A private copy of the workspace (the runs/latest link kept as a link)."""
    dest = tmp_path / "home"
    shutil.copytree(base, dest, symlinks=True)
    return dest


def test_default_runs_get_their_own_directories_linked_as_latest(home):
    first = home / "runs" / os.readlink(home / "runs" / "latest")
    before = snapshot(first)
    r = lmzoo("train", "--source", "my.txt", "--max_steps", "2", *TINY, cwd=home)
    assert r.returncode == 0, r.stderr
    runs = sorted(p.name for p in (home / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all(name.startswith("gpt2-debug-") for name in runs)
    second = home / "runs" / os.readlink(home / "runs" / "latest")
    assert second != first and (second / "LATEST").is_file()
    assert snapshot(first) == before  # the first run is untouched, its checkpoints and metrics included


def test_a_second_run_into_a_run_directory_is_refused_and_leaves_it_byte_identical(home, capsys, monkeypatch):
    run = home / "runs" / "latest"
    before = snapshot(run.resolve())
    r = lmzoo("train", "--source", "my.txt", "--max_steps", "2", "--out_dir", "runs/latest", *TINY, cwd=home)
    one_line_error(r, "holds another run", "--resume", "--out_dir", "--overwrite")
    assert snapshot(run.resolve()) == before
    # --overwrite is the explicit way: the old run's files go, the new run's come
    monkeypatch.chdir(home)
    rc, _, err = cli(capsys, "train", "--source", "my.txt", "--max_steps", "2", "--seed", "7", "--out_dir",
                     "runs/latest", "--overwrite", *TINY)
    assert rc == 0, err
    assert json.loads((run / "train_config.json").read_text())["seed"] == 7
    assert len([ln for ln in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in ln]) == 1


def test_the_readme_finetune_line_leaves_the_base_run_untouched(home, capsys, monkeypatch):
    base_run = (home / "runs" / "latest").resolve()
    before = snapshot(base_run)
    # the README's line, at a tiny budget: no --tokenizer (the base's is the default), no --out_dir
    r = lmzoo("finetune", "runs/latest", "--source=my.txt", "--max_steps=2", "--eval_iters=1", "--batch_size=2",
              "--block_size=16", "--progress=false", "--device=cpu", "--threads=1", cwd=home)
    assert r.returncode == 0, r.stderr
    assert snapshot(base_run) == before
    tuned = (home / "runs" / "latest").resolve()
    assert tuned != base_run and tuned.parent == base_run.parent and (tuned / "adapter").is_dir()
    # and never into the base, even when asked
    monkeypatch.chdir(home)
    rc, _, err = cli(capsys, "finetune", str(base_run), "--source=my.txt", "--max_steps=2", f"--out_dir={base_run}",
                     "--overwrite")
    assert rc == 2 and "run of its own" in err
    assert snapshot(base_run) == before


def test_a_missing_data_dir_is_one_line_and_writes_nothing(home):
    before = snapshot(home)
    r = lmzoo("train", "--data_dir=data/nope", "--max_steps=2", *TINY, cwd=home)
    one_line_error(r, "data/nope", "--source")
    assert snapshot(home) == before  # no data/nope, no new run directory


def test_prepare_input_alone_prepares_that_file_and_named_data_is_checked(home, capsys, monkeypatch):
    r = lmzoo("prepare", "--input", "my.txt", "--out", "data/x", "--tokenizer", "byte", cwd=home)
    assert r.returncode == 0, r.stderr
    meta = json.loads((home / "data" / "x" / "meta.json").read_text())
    assert meta["source_name"] == str((home / "my.txt").resolve()) and meta["source_bytes"] == len(TEXT)
    monkeypatch.chdir(home)
    rc, _, err = cli(capsys, "prepare", "--out", "data/y")
    assert rc == 2 and "name a corpus" in err and not (home / "data" / "y").exists()
    # a data_dir prepared from one file is not trained on as if it were another
    (home / "other.txt").write_text("something else entirely\n" * 100)
    rc, _, err = cli(capsys, "train", "--source", "other.txt", "--data_dir", "data/x", "--max_steps", "2", *TINY)
    assert rc == 2 and "data/x was prepared from" in err and "my.txt" in err


def test_resume_with_out_dir_and_max_steps_continues_bit_identically(home, capsys, monkeypatch):
    monkeypatch.chdir(home)
    common = ["--source", "my.txt", "--decay_steps", "4", *TINY]
    assert cli(capsys, "train", "--out_dir", "straight", "--max_steps", "4", *common)[0] == 0
    assert cli(capsys, "train", "--out_dir", "split", "--max_steps", "2", *common)[0] == 0
    # nothing but the run and the new step count: model, data, tokenizer and schedule come from the run
    r = lmzoo("train", "--resume", "--out_dir=split", "--max_steps=4", cwd=home)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    a = load_file(home / "straight" / "ckpt-00000004" / "model.safetensors")
    b = load_file(home / "split" / "ckpt-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # what may not change is refused by name; a step count already reached too
    rc, _, err = cli(capsys, "train", "--resume", "--out_dir=split", "--max_steps=6", "--lr=0.5")
    assert rc == 2 and "resume: lr" in err
    rc, _, err = cli(capsys, "train", "--resume", "--out_dir=split", "--max_steps=4")
    assert rc == 2 and "step 4" in err and "--max_steps" in err


def test_report_and_plot_write_only_where_asked(tmp_path, capsys, monkeypatch):
    """From a repository root: RESULTS.md (a tracked file) stays as it is without --out."""
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    shutil.copyfile(ROOT / "RESULTS.md", repo / "RESULTS.md")
    shutil.copytree(ROOT / "results" / "improved-vs-baseline", repo / "results" / "exp")
    before = (repo / "RESULTS.md").read_bytes()
    r = lmzoo("report", "results/exp", cwd=repo)
    assert r.returncode == 0, r.stderr
    assert (repo / "RESULTS.md").read_bytes() == before and (repo / "results" / "exp" / "report.md").is_file()
    monkeypatch.chdir(repo)
    rc, _, err = cli(capsys, "report", "results/exp", "results/exp")
    assert rc == 2 and "--out" in err and (repo / "RESULTS.md").read_bytes() == before
    run = repo / "run"
    run.mkdir()
    records = [{"kind": "train", "step": s, "loss": 3.0 - s / 10, "tokens": 64 * s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli(capsys, "plot", "run")[0] == 0
    assert (run / "loss.png").is_file() and not (repo / "loss.png").exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_130(home):
    """(SIGTERM: 143, tests/test_train.py)"""
    sig = signal.SIGINT
    p = subprocess.Popen([sys.executable, "-m", "lmzoo", "train", "--source", "my.txt", "--out_dir", "r",
                          "--max_steps", "100000", *TINY], cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 60
    while not (home / "r" / "metrics.jsonl").is_file() or '"train"' not in (home / "r" / "metrics.jsonl").read_text():
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err  # 130 for Ctrl-C, 143 for SIGTERM: `lmzoo train && next` stops
    assert "interrupted" in out and (home / "r" / "LATEST").is_file()


def test_one_option_convention_across_verbs(home, capsys, monkeypatch):
    def config(*args: str) -> dict:
        rc, out, err = cli(capsys, "train", *args, "--print_config")
        assert rc == 0, err
        return yaml.safe_load(out)

    monkeypatch.chdir(home)

    # --key value, --key=value, hyphens or underscores: one setting; dotted keys take a value either way
    a = config("--max-steps", "7", "--model.n-layer", "3", "--sample_prompt", "def ")
    b = config("--max_steps=7", "--model.n_layer=3", "--sample-prompt=def ")
    assert a == b and a["max_steps"] == 7 and a["model_args"] == {"n_layer": 3} and a["sample_prompt"] == "def "
    # the issue's own example: generate's options take the same spellings
    r = lmzoo("generate", "--checkpoint", "runs/latest", "--max_new_tokens", "3", "--prompt", "the ", "--seed", "1",
              cwd=home)
    assert r.returncode == 0 and r.stdout.startswith("the "), r.stderr
    rc, out, err = cli(capsys, "info", "gpt2-debug", "--model.n_layer", "3")
    assert rc == 0 and "gpt2-debug" in out, err
    rc, _, err = cli(capsys, "train", "--max_step", "3")
    assert rc == 2 and "did you mean: --max_steps" in err and len(err.strip().splitlines()) == 1


def test_help_lists_every_setting_with_type_default_and_meaning(capsys):
    from lmzoo.cli.app import main
    from lmzoo.config import field_docs
    from lmzoo.train import TrainConfig

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    docs = field_docs(TrainConfig)
    for name in TrainConfig.field_names():
        meaning = " ".join(docs[name][0].split())
        assert f"--{name} " in text and meaning and meaning[:40] in text, name
    assert "--max_steps INT optimizer steps to train (the run ends there) (default 2000)" in text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    import lmzoo

    assert e.value.code == 0 and capsys.readouterr().out.strip().startswith(f"lmzoo {lmzoo.__version__}")


def test_version_and_print_config_through_the_real_cli(tmp_path, capsys, monkeypatch):
    from lmzoo import __version__

    r = lmzoo("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"lmzoo {__version__} (torch {torch.__version__}"), r
    r = lmzoo("train", "--print-config", "--max-steps", "7", "--model.n-layer=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []  # printing the settings prepares, trains and writes nothing
    printed = yaml.safe_load(r.stdout)
    assert printed["max_steps"] == 7 and printed["model_args"] == {"n_layer": 3}
    # what it prints is a recipe: read back with --config, it gives the same settings
    (tmp_path / "recipe.yaml").write_text(r.stdout)
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "train", "--config", "recipe.yaml", "--print_config")
    assert rc == 0 and yaml.safe_load(out) == printed, err


def test_bench_fits_the_preset_and_reports_median_and_spread(home, capsys):
    r = lmzoo("bench", "generate", "--preset", "gpt2-char-cpu", "--repeats", "3", cwd=home)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["new_tokens"] == 64 - 16 and res["dtype"] == "float32" and res["repeats"] == 3  # its context; CPU
    assert res["tokens_per_s_min"] <= res["tokens_per_s"] <= res["tokens_per_s_max"]
    rc, out, err = cli(capsys, "bench", "train", "--preset", "gpt2-debug", "--batch", "2", "--steps", "1",
                       "--warmup", "1", "--repeats", "3")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["seq"] == 32 and res["dtype"] == "float32" and res["tokens_per_s_min"] <= res["tokens_per_s_max"]


def test_eval_shows_progress_on_long_inputs(home, capsys, monkeypatch):
    (home / "long.txt").write_text(TEXT[:2000])  # 2,000 tokens: 125 windows of the model's 16, 16 batches of 8
    r = lmzoo("eval", "--checkpoint", "runs/latest", "--text", "long.txt", "--json", cwd=home)
    assert r.returncode == 0, r.stderr
    assert "eval:" in r.stderr and "batch" in r.stderr and json.loads(r.stdout)["long.txt"]["tokens"] > 0
    monkeypatch.chdir(home)
    rc, _, err = cli(capsys, "eval", "--checkpoint", "runs/latest", "--text", "long.txt", "--no_progress")
    assert rc == 0 and "eval:" not in err, err


def test_library_train_refuses_another_runs_directory_and_resumes_with_saved_settings(home, monkeypatch):
    from lmzoo.errors import ConfigError
    from lmzoo.train import train

    monkeypatch.chdir(home)
    settings = dict(model="gpt2-debug", source="my.txt", tokenizer="byte", block_size=16, batch_size=2, eval_iters=1,
                    sample_tokens=0, progress=False, device="cpu", out_dir="lib", max_steps=2)
    assert train(**settings)["step"] == 2
    with pytest.raises(ConfigError, match="holds another run"):
        train(**settings)
    assert train(resume=True, out_dir="lib", max_steps=3)["step"] == 3  # model and data from the saved run


def test_the_cli_page_tables_every_exit_code_and_every_setting_a_resume_may_change():
    import re

    from lmzoo import errors
    from lmzoo.train.rundir import SAFE_ON_RESUME, exit_code

    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    tabled = {int(c) for c in re.findall(r"^\| (\d+) \|", page, flags=re.M)}
    raised = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.LmzooError)}
    assert raised | {0, 1, exit_code(signal.SIGINT), exit_code(signal.SIGTERM)} <= tabled
    resume = page.split("## Resume")[1].split("\n## ")[0]
    assert all(f"`{name}`" in resume for name in SAFE_ON_RESUME)
