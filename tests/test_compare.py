"""lmzoo compare: three tiny models under one budget, table + plots, and resuming a killed compare."""

from __future__ import annotations

import json
import time

from lmzoo.evaluation.compare import PLOTS, RESULT, compare, load_experiment, parse_run
from lmzoo.train.metrics import read_metrics


def test_compare_three_tiny_models_writes_table_plots_and_resumes(shakespeare_data, tmp_path):
    exp = load_experiment(
        runs=[parse_run("gpt:gpt2-debug"), parse_run("moe:gpt2-moe-debug:model.n_experts=4"),
              parse_run("mamba:mamba-debug")],
        budget={"tokens": 20 * 8 * 32},  # 20 steps of 8 x 32 tokens for every model
        out_dir=str(tmp_path / "cmp"), target_loss=10.0,
        common={"data_dir": str(shakespeare_data), "batch_size": 8, "eval_interval": 10, "eval_iters": 2,
                "threads": 1, "warmup_steps": 2},
    )
    lines: list[str] = []
    table = compare(exp, command="lmzoo compare ...", log=lines.append, isolate=False)
    out = tmp_path / "cmp"
    assert [r["run"] for r in table["rows"]] == ["gpt", "moe", "mamba"]
    for r in table["rows"]:
        assert r["tokens"] == 20 * 8 * 32 and r["params"] > 0 and r["tokens_per_s"] > 0
        assert r["best_val_loss"] < 5 and r["peak_memory_bytes"] > 0 and r["time_to_target_s"] is not None
    md = (out / "table.md").read_text()
    assert "| gpt | `gpt2-debug` |" in md and "time to 10.0" in md
    assert json.loads((out / "table.json").read_text())["rows"][1]["model"] == "gpt2-moe-debug"
    for name in PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Simulate a compare killed during the last run, after its step-10 checkpoint: no result, LATEST at
    # step 10. The rerun skips the finished runs and continues the killed one from step 10.
    mamba = out / "runs" / "mamba-s1337"
    (mamba / RESULT).unlink()
    (mamba / "ckpt-00000020").rename(mamba / "gone")
    (mamba / "LATEST").write_text("ckpt-00000010\n")
    done = {n: (out / "runs" / f"{n}-s1337" / RESULT).stat().st_mtime for n in ("gpt", "moe")}
    time.sleep(0.01)
    lines.clear()
    table2 = compare(exp, log=lines.append, isolate=False)
    assert sum("skipped" in line for line in lines) == 2 and any("mamba (seed 1337): resuming" in x for x in lines)
    assert all((out / "runs" / f"{n}-s1337" / RESULT).stat().st_mtime == t for n, t in done.items())
    starts = [r for r in read_metrics(mamba) if r.get("event") == "start"]
    assert [r["step"] for r in starts] == [0, 10]  # the second session began at the checkpoint
    assert table2["rows"][2]["tokens"] == 20 * 8 * 32
