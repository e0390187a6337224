"""Every optional package, when missing, is one line naming the lmzoo extra that installs it (exit code 2),
never a traceback, and is refused before any long work starts.

A package is made absent by a None entry in ``sys.modules`` (``import`` then raises ImportError, as it
does when the package is not installed). Modules that look for their package when imported (the
Lightning and lm-eval integrations) are imported in a fresh interpreter instead.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lmzoo
from lmzoo.cli.app import main
from lmzoo.models import build
from lmzoo.tokenizer import ByteTokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 80


def _absent(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmzoo:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with a few metrics records (what `lmzoo plot` reads)."""
    d = tmp_path / "run"
    d.mkdir()
    recs = [{"kind": "train", "step": s, "tokens": 64 * s, "wall_s": 0.1 * s, "loss": 4.0 - 0.1 * s} for s in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.fixture
def checkpoint(tmp_path):
    return lmzoo.save(build("gpt2-debug", vocab_size=257), tmp_path / "ckpt", tokenizer=ByteTokenizer())


def _train_argv(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "text.txt").write_text(TEXT)
    return ["train", f"--source={tmp_path / 'text.txt'}", "--tokenizer=byte", f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'out'}", "--model=gpt2-debug", "--max_steps=1", "--device=cpu",
            "--progress=false", "--sample_tokens=0", *extra]


@pytest.mark.parametrize("absent,package,extra", [
    (("scipy", "scipy.optimize"), "scipy", "scaling"),
    (("matplotlib", "matplotlib.pyplot"), "matplotlib", "scaling"),
])
def test_scale_without_scipy_or_matplotlib_names_the_extra_before_training(tmp_path, capsys, monkeypatch, absent,
                                                                           package, extra):
    _absent(monkeypatch, *absent)
    line = _one_line_error(capsys, ["scale", "--out", str(tmp_path / "scale")])
    assert f"needs {package}: pip install 'lmzoo[{extra}]'" in line
    assert not (tmp_path / "scale").exists()  # refused before the sweep prepared or trained anything


def test_plot_without_matplotlib_names_the_extra(run_dir, capsys, monkeypatch):
    _absent(monkeypatch, "matplotlib", "matplotlib.pyplot")
    line = _one_line_error(capsys, ["plot", str(run_dir)])
    assert line == "lmzoo: error: lmzoo plot needs matplotlib: pip install 'lmzoo[logging]'"


def test_compare_without_matplotlib_names_the_extra_before_training(tmp_path, capsys, monkeypatch):
    _absent(monkeypatch, "matplotlib", "matplotlib.pyplot")
    out = tmp_path / "cmp"
    line = _one_line_error(capsys, ["compare", "--run", "a:gpt2-debug", "--budget", "steps=2", "--out", str(out)])
    assert line == "lmzoo: error: lmzoo compare (its plots) needs matplotlib: pip install 'lmzoo[logging]'"
    assert not (out / "runs").exists()


@pytest.mark.parametrize("setting,absent,message", [
    ("--tensorboard=true", ("tensorboard", "torch.utils.tensorboard"),
     "tensorboard=true needs tensorboard: pip install 'lmzoo[logging]'"),
    ("--wandb=true", ("wandb",), "wandb=true needs wandb: pip install 'lmzoo[wandb]'"),
])
def test_training_loggers_without_their_package_name_the_extra(tmp_path, capsys, monkeypatch, setting, absent,
                                                                message):
    _absent(monkeypatch, *absent)
    assert _one_line_error(capsys, _train_argv(tmp_path, setting)) == f"lmzoo: error: {message}"


@pytest.mark.parametrize("absent", ["fastapi", "uvicorn"])
def test_serve_without_fastapi_or_uvicorn_names_the_extra(checkpoint, capsys, monkeypatch, absent):
    _absent(monkeypatch, absent)
    line = _one_line_error(capsys, ["serve", "--checkpoint", str(checkpoint), "--port", "0"])
    assert line.endswith("pip install 'lmzoo[serve]'")


def test_parquet_and_hub_data_without_their_packages_name_the_extra(tmp_path, capsys, monkeypatch):
    _absent(monkeypatch, "pyarrow", "pyarrow.parquet", "datasets")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    line = _one_line_error(capsys, ["prepare", str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "p")])
    assert "needs pyarrow: pip install 'lmzoo[hf]'" in line
    line = _one_line_error(capsys, ["prepare", "hf:someone/some-data", "--out", str(tmp_path / "h")])
    assert "needs datasets: pip install 'lmzoo[hf]'" in line


def test_gguf_without_its_package_names_the_extra(tmp_path, monkeypatch):
    from lmzoo.errors import CheckpointError

    _absent(monkeypatch, "gguf")
    message = r"^reading or writing GGUF files needs gguf: pip install 'lmzoo\[gguf\]'$"
    with pytest.raises(CheckpointError, match=message):
        lmzoo.to_gguf(build("llama-debug"), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_nvml_readings_are_simply_absent_without_nvidia_ml_py(monkeypatch):
    """The one optional package whose absence is not an error: the GPU readings are left out."""
    from lmzoo.train import loggers

    _absent(monkeypatch, "pynvml")
    monkeypatch.setattr(loggers, "_NVML", None)
    assert loggers._nvml() is False


def test_lightning_and_lm_eval_integrations_without_their_packages_name_the_extra(checkpoint):
    """Both integrations look for their package when imported: a fresh interpreter without them."""
    code = f"""
import json, sys
sys.modules["lightning"] = sys.modules["lm_eval"] = None
import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.integrations.lightning import LMModule
from lmzoo.integrations.lm_eval import LmzooLM
out = []
for make in (lambda: LMModule(lmzoo.build("gpt2-debug")), lambda: LmzooLM({str(checkpoint)!r})):
    try:
        make()
        out.append("no error")
    except ConfigError as e:
        out.append(str(e))
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lightning, lm_eval = json.loads(res.stdout.strip().splitlines()[-1])
    assert lightning.endswith("pip install 'lmzoo[lightning]'") and "\n" not in lightning
    assert lm_eval.endswith("pip install 'lmzoo[lm-eval]'") and "\n" not in lm_eval
