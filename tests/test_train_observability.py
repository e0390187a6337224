"""What a run tells: JSONL schema, TensorBoard and W&B files, MFU, plots, profiler traces, the
Chinchilla estimate, and the YAML recipes (each run for two steps so they never rot)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmzoo.cli.app import main
from lmzoo.errors import ConfigError
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train import chinchilla as ch
from lmzoo.train.metrics import read_metrics
from lmzoo.train.mfu import device_peak_flops, lookup_peak_flops, mfu

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(600))


@pytest.fixture(scope="module")
def data_dir(prepare_text) -> Path:
    return prepare_text(TEXT)


def tiny(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model="gpt2-debug",
        model_args={"block_size": 16},
        data_dir=str(data_dir),
        out_dir=str(out),
        batch_size=2,
        block_size=16,
        max_steps=4,
        eval_interval=2,
        eval_iters=1,
        warmup_steps=1,
        device="cpu",
        dtype="float32",
        progress=False,
        sample_tokens=0,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """One run with TensorBoard, a given peak (MFU on CPU) and every-step system readings."""
    out = tmp_path_factory.mktemp("runs") / "tb-run"
    Trainer(
        tiny(
            data_dir,
            out,
            tensorboard=HAS_TENSORBOARD,
            peak_flops=1e12,
            system_metrics_interval=1,
            run_name="my-run",
        )
    ).train()
    return out


def test_jsonl_schema(run_dir):
    recs = read_metrics(run_dir)
    start = recs[0]
    assert start["kind"] == "event" and start["event"] == "start" and start["run_name"] == "my-run"
    for key in (
        "params",
        "non_embedding_params",
        "device",
        "dtype",
        "flops_per_token",
        "peak_flops",
        "wall_s",
    ):
        assert key in start, key
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for key in (
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "tokens_per_s",
            "step_ms",
            "micro_batches",
            "mfu",
            "wall_s",
        ):
            assert key in r, key
        assert r["mfu"] == pytest.approx(start["flops_per_token"] * r["tokens_per_s"] / 1e12)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all("val_loss" in r for r in evals)
    assert recs[-1]["event"] == "end" and recs[-1]["stop_reason"] == "max_steps"


@pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard is an optional extra (pip install 'lmzoo[logging]')"
)
def test_tensorboard_event_files_are_readable_by_tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/mfu",
        "eval/val_loss",
    ):
        assert tag in tags, tag
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    jsonl = [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [e.value for e in loss] == pytest.approx(jsonl)


def test_wandb_logger_works_offline(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'lmzoo[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "wb"
    Trainer(tiny(data_dir, out, wandb=True, max_steps=2)).train()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (out / "wandb_id").read_text().strip() in runs[0].name


def _fake_cuda_allocator(monkeypatch) -> None:
    """torch.cuda's memory counters answering fixed sizes, so system_metrics runs without a GPU."""
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * gib)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA driver is present: NVML answers here")
def test_nvml_without_a_driver_leaves_only_the_gpu_readings_out(monkeypatch):
    """nvidia-ml-py's own answer on a machine without a driver (NVMLError) takes lmzoo's no-NVML path:
    the allocator's memory fields stay, utilization, power and temperature are absent."""
    import pynvml

    from lmzoo.train import loggers

    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    monkeypatch.setattr(loggers, "_NVML", None)
    assert loggers._nvml() is False and loggers._NVML is False
    _fake_cuda_allocator(monkeypatch)
    out = loggers.system_metrics(torch.device("cuda", 0))
    assert out == {"mem_allocated_gb": 1.0, "mem_reserved_gb": 2.0, "mem_peak_gb": 3.0}
    assert loggers.system_metrics(torch.device("cpu")) == {}


def test_nvml_readings_are_logged_when_nvml_answers(monkeypatch):
    """With NVML answering (nvidia-ml-py's functions, their return shapes kept), each reading
    lands in its field in lmzoo's units: utilization %, watts from milliwatts, degrees C."""
    import pynvml

    from lmzoo.train import loggers

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: pynvml.c_nvmlUtilization_t(gpu=87, memory=5))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda h: 312_500)  # milliwatts
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature",
                        lambda h, sensor: 64 if sensor == pynvml.NVML_TEMPERATURE_GPU else -1)
    monkeypatch.setattr(loggers, "_NVML", pynvml)
    _fake_cuda_allocator(monkeypatch)
    out = loggers.system_metrics(torch.device("cuda", 0))
    assert out["gpu_util_pct"] == 87.0 and out["gpu_power_w"] == 312.5 and out["gpu_temp_c"] == 64.0
    assert out["mem_allocated_gb"] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and its driver")
def test_nvml_reads_a_real_gpu(monkeypatch):
    from lmzoo.train import loggers

    monkeypatch.setattr(loggers, "_NVML", None)
    out = loggers.system_metrics(torch.device("cuda", 0))
    assert 0 <= out["gpu_util_pct"] <= 100 and out["gpu_power_w"] > 0 and 0 < out["gpu_temp_c"] < 120


def test_mfu_uses_the_gpu_table_and_needs_a_peak_on_cpu():
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert lookup_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert lookup_peak_flops("NVIDIA L4") == 121e12 and lookup_peak_flops("NVIDIA L40S") == 362e12
    assert lookup_peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert lookup_peak_flops("Some Future Accelerator") is None
    assert device_peak_flops(torch.device("cpu"))[0] is None
    assert device_peak_flops(torch.device("cpu"), 2e12)[0] == 2e12
    assert mfu(6e9, 1000.0, 1e13) == pytest.approx(0.6) and mfu(1.0, 1.0, None) is None


def test_plot_draws_several_runs_into_a_png(run_dir, data_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install 'lmzoo[logging]')")
    other = tmp_path / "other"
    Trainer(tiny(data_dir, other, lr=1e-2)).train()
    out = tmp_path / "loss.png"
    assert main(["plot", str(run_dir), str(other), "--out", str(out), "--x", "tokens"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_profile_writes_a_chrome_trace(data_dir, tmp_path):
    out = tmp_path / "prof"
    Trainer(tiny(data_dir, out, profile=True, profile_steps=2, max_steps=5, eval_interval=0)).train()
    traces = list((out / "profile").glob("*.pt.trace.json*"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_chinchilla_rules():
    p = ch.for_params(70e9)
    assert p.tokens == pytest.approx(1.4e12) and p.flops == pytest.approx(6 * 70e9 * 1.4e12)
    q = ch.for_flops(p.flops)
    assert q.params == pytest.approx(70e9) and q.tokens == pytest.approx(1.4e12)
    a3 = ch.for_flops(5.76e23, "approach3")  # Gopher's budget; the published fit gives ~32B
    assert 6 * a3.params * a3.tokens == pytest.approx(5.76e23)
    assert 25e9 < a3.params < 45e9
    assert ch.for_params(a3.params, "approach3").tokens == pytest.approx(a3.tokens)
    with pytest.raises(ConfigError):
        ch.for_flops(-1)


def test_cli_info_chinchilla(run_dir, capsys):
    assert main(["info", "gpt2", "--chinchilla", "--tokens-per-s", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "optimal tokens       2.49B (20.0/parameter)" in out and "41.5 min at 1,000,000 tokens/s" in out
    assert main(["info", "--flops", "1e21", "--method", "approach3"]) == 0
    assert "optimal parameters" in capsys.readouterr().out
    assert main(["info", "gpt2-debug", "--chinchilla", "--from-run", str(run_dir)]) == 0
    assert "tokens/s (measured in" in capsys.readouterr().out
    assert main(["info", "--flops", "-5"]) == 2


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_runs_two_steps_on_a_local_stand_in(recipe, data_dir, tmp_path, capsys):
    """Each recipe, as written, with a tiny model, a local data set and CPU: it never rots."""
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--config",
            str(RECIPES / recipe),
            f"--data_dir={data_dir}",
            "--source=none",  # the stand-in data replaces the recipe's corpus (named data is checked against it)
            f"--out_dir={out}",
            "--model.n_layer=1",
            "--model.n_head=4",
            "--model.n_embd=32",
            "--model.block_size=16",
            "--block_size=16",
            "--batch_size=2",
            "--grad_accum=2",
            "--max_steps=2",
            "--warmup_steps=1",
            "--decay_steps=2",
            "--eval_interval=2",
            "--eval_iters=1",
            "--device=cpu",
            "--dtype=float32",
            "--compile=false",
            "--progress=false",
            "--sample_tokens=0",
            "--tensorboard=false",
            "--max_time_s=0",
            "--schedule_unit=steps",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2]
