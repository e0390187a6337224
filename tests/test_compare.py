"""lmzoo compare: three tiny models under one budget, table + plots, and resuming a killed compare."""

from __future__ import annotations

import json
import time

from lmzoo.evaluation.compare import PLOTS, RESULT, compare, load_experiment, parse_run, summarize_run
from lmzoo.train.metrics import read_metrics


def _first_eval_at_or_below(run_dir, target: float) -> dict | None:
    """The run's first evaluation record whose val loss is at most ``target``, read from metrics.jsonl."""
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    return next((r for r in evals if r["val_loss"] <= target), None)


def test_compare_three_tiny_models_writes_table_plots_and_resumes(shakespeare_data, tmp_path):
    kw = dict(
        runs=[parse_run("gpt:gpt2-debug"), parse_run("moe:gpt2-moe-debug:model.n_experts=4"),
              parse_run("mamba:mamba-debug")],
        budget={"tokens": 20 * 8 * 32},  # 20 steps of 8 x 32 tokens for every model
        out_dir=str(tmp_path / "cmp"),
        common={"data_dir": str(shakespeare_data), "batch_size": 8, "eval_interval": 10, "eval_iters": 2,
                "threads": 1, "warmup_steps": 2},
    )
    exp = load_experiment(**kw)
    lines: list[str] = []
    table = compare(exp, command="lmzoo compare ...", log=lines.append, isolate=False)
    out = tmp_path / "cmp"
    assert [r["run"] for r in table["rows"]] == ["gpt", "moe", "mamba"]
    for r in table["rows"]:
        assert r["tokens"] == 20 * 8 * 32 and r["params"] > 0 and r["tokens_per_s"] > 0
        assert r["best_val_loss"] < 5 and r["peak_memory_bytes"] > 0 and r["time_to_target_s"] is None
    md = (out / "table.md").read_text()
    assert "| gpt | `gpt2-debug` |" in md and "time to target" in md

    # Time to target: a target between gpt's two evaluations (the first misses it, the second reaches it),
    # summarized again from the stored runs. Each row times the first evaluation at or below it, or none.
    gpt = [r for r in read_metrics(out / "runs" / "gpt-s1337") if r["kind"] == "eval"]
    assert [r["step"] for r in gpt] == [10, 20] and gpt[1]["val_loss"] < gpt[0]["val_loss"]
    target = (gpt[0]["val_loss"] + gpt[1]["val_loss"]) / 2
    retimed = compare(load_experiment(**kw, target_loss=target), log=lambda m: None, isolate=False)
    for r in retimed["rows"]:
        hit = _first_eval_at_or_below(out / "runs" / f"{r['run']}-s1337", target)
        assert r["time_to_target_s"] == (hit["wall_s"] if hit else None)
        tokens = summarize_run(out / "runs" / f"{r['run']}-s1337", target)["tokens_to_target"]
        assert tokens == (hit["tokens"] if hit else None)
    assert retimed["rows"][0]["time_to_target_s"] == gpt[1]["wall_s"] > gpt[0]["wall_s"]
    assert f"time to {target}" in (out / "table.md").read_text()
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
