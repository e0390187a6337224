"""``lmzoo compare``: train several models on the same data under the same budget, then tabulate and plot.

An experiment is a YAML file (docs/compare.md)::

    name: moe-vs-dense
    title: Mixture of experts vs dense at equal steps
    out_dir: runs/compare/moe-vs-dense
    budget: {steps: 200}          # or {tokens: N}, {flops: F} or {time_s: S}
    seeds: [1337]
    target_loss: 2.0              # optional: time and tokens to reach it
    common: {source: shakespeare, tokenizer: char, batch_size: 8, block_size: 64, eval_interval: 50}
    runs:
      - {name: dense, model: gpt2-char-cpu}
      - {name: moe, model: gpt2-moe-char-cpu, model_args: {n_expert: 4}}

Fairness: the data is prepared once and every run reads the same ``data_dir``; the budget is turned
into the same number of tokens (the sum over steps of batch x context x that step's micro-batches,
so a batch-size ramp's smaller steps count as such), FLOPs (tokens x ``flops_per_token``) or
seconds (``max_time_s``, the learning rate decayed over wall time) for every run; each seed is a
separate run. Each run trains in its own Python process, so peak memory (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is the run's own and a crash does not end the others.

Resumable: a finished run leaves ``result.json`` and is skipped; an unfinished one (killed
compare) continues from its newest checkpoint (``resume=True``), so rerunning the same command
finishes the experiment. Outputs in ``out_dir``: ``compare.json`` (the experiment, the command and
the machine), ``table.json``, ``table.md`` and ``val_loss_vs_{tokens,time,flops}.png``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmzoo.common import optional_import, pyplot
from lmzoo.config import read_json
from lmzoo.errors import ConfigError, DataError, Interrupted, LmzooError
from lmzoo.formats.atomic import atomic_write_text

BUDGETS = ("steps", "tokens", "flops", "time_s")
RESULT = "result.json"
PLOTS = {"tokens": "val_loss_vs_tokens.png", "time": "val_loss_vs_time.png", "flops": "val_loss_vs_flops.png"}
PLOTS_NEED = "lmzoo compare (its plots)"  # what a missing matplotlib is named for


# -- the experiment --------------------------------------------------------------------------------

def parse_run(spec: str) -> dict[str, Any]:
    """``name:preset:key=val,key=val`` -> a run dict (``model.X`` keys go to ``model_args``)."""
    from lmzoo.config import parse_overrides

    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"--run {spec!r}: expected name:preset[:key=value,...]")
    run: dict[str, Any] = {"name": parts[0], "model": parts[1]}
    if len(parts) == 3 and parts[2]:
        items = [f"--{kv}" for kv in parts[2].split(",")]
        if any("=" not in kv for kv in items):
            raise ConfigError(f"--run {spec!r}: overrides are key=value separated by commas")
        for k, v in parse_overrides(items).items():
            if k.startswith("model."):
                run.setdefault("model_args", {})[k[len("model."):]] = v
            else:
                run[k] = v
    return run


def load_experiment(path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """The experiment dict from a YAML file and/or keyword overrides (``runs``, ``budget``, ...), checked."""
    from lmzoo.config import read_yaml

    exp: dict[str, Any] = dict(read_yaml(path)) if path else {}
    for k, v in overrides.items():
        if v is None:
            continue
        exp[k] = {**exp.get(k, {}), **v} if k == "common" else v
    unknown = set(exp) - {"name", "title", "description", "out_dir", "budget", "seeds", "target_loss", "common",
                          "runs"}
    if unknown:
        raise ConfigError(f"compare: unknown experiment key(s) {', '.join(sorted(unknown))}")
    runs = exp.get("runs") or []
    if not runs:
        raise ConfigError("compare: no runs (give --config FILE with runs: or --run name:preset ...)")
    names = [r.get("name") for r in runs]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"compare: every run needs a unique name, got {names}")
    if any("model" not in r for r in runs):
        raise ConfigError("compare: every run needs a model (a preset name)")
    from lmzoo.errors import suggest
    from lmzoo.models import PRESETS

    for r in runs:  # before any (long) data preparation
        if r["model"] not in PRESETS:
            raise ConfigError(f"compare: run {r['name']}: unknown preset {r['model']!r}{suggest(r['model'], PRESETS)}")
    budget = exp.get("budget") or {"steps": 200}
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGETS:
        raise ConfigError(f"compare: budget must be one of {', '.join(BUDGETS)}, e.g. {{steps: 200}}; got {budget}")
    amount = next(iter(budget.values()))
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < float("inf"):
        raise ConfigError(f"compare: the budget must be a positive number, got {budget}")
    seeds = exp.get("seeds") or [1337]
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"compare: seeds must be a list of integers, got {seeds}")
    name = exp.get("name") or (Path(path).stem if path else "compare")
    exp.update(name=name, budget=budget, seeds=seeds, runs=runs, common=dict(exp.get("common") or {}))
    exp.setdefault("out_dir", f"runs/compare/{name}")
    exp.setdefault("title", name)
    return exp


def _train_dicts(exp: dict[str, Any], data_dir: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(run name, seed, TrainConfig dict) for every run and seed, with the budget applied."""
    import torch

    from lmzoo.data import load_meta
    from lmzoo.models import PRESETS, build_model, preset_config
    from lmzoo.train import TrainConfig
    from lmzoo.train.config import steps_for_tokens
    from lmzoo.train.variants import apply_variants

    kind, amount = next(iter(exp["budget"].items()))
    vocab = load_meta(data_dir)["vocab_size"]
    out = []
    for run in exp["runs"]:
        settings = {"progress": False, "sample_tokens": 0, **exp["common"], **run}
        settings["model_args"] = {**(exp["common"].get("model_args") or {}), **(run.get("model_args") or {})}
        settings.pop("name")
        settings["data_dir"] = data_dir  # same tokens for everyone
        args = {"vocab_size": vocab, **(settings.get("model_args") or {})}
        if settings.get("block_size"):
            args.setdefault("block_size", settings["block_size"])
        try:
            mcfg = preset_config(settings["model"], **args)
        except LmzooError as e:
            raise ConfigError(f"compare: run {run['name']}: {e}") from None
        T = settings.get("block_size") or mcfg.block_size
        if kind in ("tokens", "flops"):  # steps of batch x context x micro-batches, the ramp's step by step
            try:
                tc = TrainConfig.from_dict(settings)
            except LmzooError as e:
                raise ConfigError(f"compare: run {run['name']}: {e}") from None
        if kind == "steps":
            settings["max_steps"] = int(amount)
        elif kind == "tokens":
            settings["max_steps"] = steps_for_tokens(float(amount), tc, T)
        elif kind == "flops":  # the FLOPs of the model the run trains: its variants too (extra heads)
            with torch.device("meta"):
                model = apply_variants(build_model(PRESETS[settings["model"]][0], mcfg), tc.multi_token, tc.bitnet)
                fpt = model.flops_per_token(T, recurrent=tc.recurrence)  # XL: its memory only with recurrence
            settings["max_steps"] = steps_for_tokens(float(amount) / fpt, tc, T)
        else:  # wall clock: the step count is only a ceiling, the schedule follows time
            settings["max_time_s"] = float(amount)
            settings.setdefault("max_steps", 10**9)
            settings.setdefault("schedule_unit", "time")
        for seed in exp["seeds"]:
            cfg = {**settings, "seed": seed, "out_dir": str(Path(exp["out_dir"]) / "runs" / f"{run['name']}-s{seed}")}
            try:
                TrainConfig.from_dict(cfg)  # every mistake before the first (long) run starts
            except LmzooError as e:
                raise ConfigError(f"compare: run {run['name']}: {e}") from None
            out.append((run["name"], seed, cfg))
    return out


def _prepare_data(exp: dict[str, Any]) -> str:
    from lmzoo.data import prepare
    from lmzoo.train import TrainConfig
    from lmzoo.train.runtime import data_plan

    common = {k: v for k, v in exp["common"].items() if k in ("source", "input", "tokenizer", "vocab_size",
                                                              "data_dir")}
    cfg = TrainConfig.from_dict(common)
    data_dir, source = data_plan(cfg)  # an unprepared data_dir needs a source to prepare
    if source is not None:
        print(f"compare: preparing {source!r} with the {cfg.tokenizer} tokenizer into {data_dir}", flush=True)
        prepare(source, data_dir, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, input=cfg.input)
    return str(data_dir)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(terse=True), "python": platform.python_version(),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- one run (in its own process) --------------------------------------------------------------------

def _peak_memory(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":  # reset by the worker before training
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS of the process"


def run_worker(cfg_file: str | Path) -> int:
    """Train one run from its TrainConfig JSON; on completion write ``result.json`` next to its metrics."""
    from lmzoo.train import TrainConfig, Trainer
    from lmzoo.train.rundir import exit_code, holds_run

    settings = read_json(cfg_file)
    out = Path(settings["out_dir"])
    settings["resume"] = holds_run(out)  # a killed compare continues where it stopped
    trainer = Trainer(TrainConfig.from_dict(settings))
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(trainer.device)
    summary = trainer.train()
    if summary["interrupted"]:
        return exit_code(trainer.stop_signal)  # 130 (SIGINT) or 143 (SIGTERM)
    peak, how = _peak_memory(trainer.device)
    result = {**summary, "peak_memory_bytes": peak, "peak_memory_kind": how, "params": trainer.model.num_params(),
              "flops_per_token": trainer.flops_per_token, "device": str(trainer.device),
              "device_name": trainer.device_name}
    atomic_write_text(out / RESULT, json.dumps(result, indent=2, default=str))
    return 0


# -- summaries ---------------------------------------------------------------------------------------

def curves(run_dir: str | Path) -> list[dict[str, float]]:
    """Eval points of a run: step, tokens, cumulative wall seconds (over resumed sessions) and val loss."""
    from lmzoo.train.metrics import read_metrics

    points, offset, last_wall = [], 0.0, 0.0
    for r in read_metrics(run_dir):
        if r.get("kind") == "event" and r.get("event") == "start" and last_wall:
            offset += last_wall  # a resumed session: its clock restarts at 0
            last_wall = 0.0
        last_wall = max(last_wall, float(r.get("wall_s", 0.0)))
        if r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float)):
            points.append({"step": r["step"], "tokens": r.get("tokens", 0), "wall_s": offset + r["wall_s"],
                           "val_loss": r["val_loss"]})
    return points


def summarize_run(run_dir: str | Path, target_loss: float | None = None) -> dict[str, Any]:
    """One table row from a finished run's ``result.json`` and ``metrics.jsonl``."""
    from lmzoo.train.metrics import read_metrics

    run_dir = Path(run_dir)
    res = read_json(run_dir / RESULT, DataError)
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    rates = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
    mfus = [r["mfu"] for r in train if isinstance(r.get("mfu"), (int, float))]
    skip = min(len(rates) - 1, 5) if rates else 0  # the first steps (warm-up) are not representative
    pts = curves(run_dir)
    hit = next((p for p in pts if target_loss is not None and p["val_loss"] <= target_loss), None)
    fpt = res.get("flops_per_token") or 0.0
    return {
        "params": res.get("params"),
        "steps": res.get("step"),
        "tokens": res.get("tokens"),
        "tokens_per_s": statistics.median(rates[skip:]) if rates else None,
        "mfu": statistics.median(mfus[skip:]) if mfus else None,
        "peak_memory_bytes": res.get("peak_memory_bytes"),
        "peak_memory_kind": res.get("peak_memory_kind"),
        "best_val_loss": min((p["val_loss"] for p in pts), default=res.get("best_val_loss")),
        "final_val_loss": pts[-1]["val_loss"] if pts else res.get("val_loss"),
        "train_time_s": res.get("train_time_s"),
        "flops": fpt * (res.get("tokens") or 0),
        "time_to_target_s": hit["wall_s"] if hit else None,
        "tokens_to_target": hit["tokens"] if hit else None,
        "device": res.get("device_name") or res.get("device"),
    }


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def build_table(exp: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run rows averaged over seeds (best val loss also as min..max), plus every seed's row."""
    out = []
    for run in exp["runs"]:
        mine = [r for r in rows if r["run"] == run["name"]]
        if not mine:
            continue
        losses = [r["best_val_loss"] for r in mine]
        hits = [r["time_to_target_s"] for r in mine]
        out.append({
            "run": run["name"], "model": run["model"], "seeds": len(mine),
            **{k: _mean([r[k] for r in mine]) for k in ("params", "tokens", "tokens_per_s", "mfu",
                                                        "peak_memory_bytes", "best_val_loss", "train_time_s",
                                                        "flops")},
            "best_val_loss_range": [min(losses), max(losses)],
            "time_to_target_s": _mean(hits) if all(h is not None for h in hits) else None,
        })
    return {"name": exp["name"], "title": exp["title"], "budget": exp["budget"], "target_loss": exp.get("target_loss"),
            "rows": out, "seeds": rows}


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "int":
        return f"{int(round(v)):,}"
    if kind == "mem":
        return f"{v / 2**20:,.0f} MiB"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "sci":
        return f"{v:.3g}"
    if kind == "s":
        return f"{v:,.1f} s"
    return f"{v:.4f}"


def table_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown: one row per run, seeds averaged."""
    target = table.get("target_loss")
    head = ["run", "model", "params", "tokens", "tokens/s", "MFU", "peak memory", "best val loss", "train time",
            f"time to {target}" if target is not None else "time to target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        loss = _fmt(r["best_val_loss"], "loss")
        lo, hi = r["best_val_loss_range"]
        if r["seeds"] > 1:
            loss += f" ({lo:.4f}–{hi:.4f}, {r['seeds']} seeds)"
        cells = [r["run"], f"`{r['model']}`", _fmt(r["params"], "int"), _fmt(r["tokens"], "int"),
                 _fmt(r["tokens_per_s"], "int"), _fmt(r["mfu"], "pct"), _fmt(r["peak_memory_bytes"], "mem"), loss,
                 _fmt(r["train_time_s"], "s"), _fmt(r["time_to_target_s"], "s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(exp: dict[str, Any], out_dir: Path) -> list[Path]:
    """val loss vs tokens, vs wall time and vs training FLOPs, one line per run and seed."""
    plt = pyplot(PLOTS_NEED)
    written = []
    for axis, fname in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for run in exp["runs"]:
            for seed in exp["seeds"]:
                d = out_dir / "runs" / f"{run['name']}-s{seed}"
                if not (d / RESULT).is_file():
                    continue
                fpt = read_json(d / RESULT, DataError).get("flops_per_token") or 0.0
                pts = curves(d)
                xs = [p["tokens"] if axis == "tokens" else p["wall_s"] if axis == "time" else p["tokens"] * fpt
                      for p in pts]
                label = run["name"] if len(exp["seeds"]) == 1 else f"{run['name']} (seed {seed})"
                ax.plot(xs, [p["val_loss"] for p in pts], marker="o", markersize=3, label=label)
        ax.set_xlabel({"tokens": "tokens", "time": "wall time (s)", "flops": "training FLOPs"}[axis])
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(exp["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


# -- the driver --------------------------------------------------------------------------------------

def compare(exp: dict[str, Any], command: str | None = None, log=print, isolate: bool = True) -> dict[str, Any]:
    """Run (or resume) every run of the experiment, then write compare.json, table.{json,md} and the PNGs.

    ``isolate=False`` trains in this process (faster to start, for tests): peak memory is then the
    process's peak so far, not the run's own.
    """
    optional_import("matplotlib", "logging", PLOTS_NEED)  # before any training, not after it
    out_dir = Path(exp["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = _prepare_data(exp)
    jobs = _train_dicts(exp, data_dir)
    meta = {"name": exp["name"], "title": exp["title"], "description": exp.get("description", ""),
            "command": command or "", "machine": machine(), "experiment": exp,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    atomic_write_text(out_dir / "compare.json", json.dumps(meta, indent=2, default=str))
    failed, rows = [], []
    for name, seed, cfg in jobs:
        run_dir = Path(cfg["out_dir"])
        label = f"{name} (seed {seed})"
        if (run_dir / RESULT).is_file():
            log(f"compare: {label}: finished earlier, skipped")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg_file = run_dir / "compare_run.json"
            atomic_write_text(cfg_file, json.dumps(cfg, indent=2))
            how = "resuming" if (run_dir / "LATEST").is_file() else "training"
            log(f"compare: {label}: {how} {cfg['model']} in {run_dir}")
            if isolate:
                with open(run_dir / "train.log", "a", encoding="utf-8") as logf:
                    rc = subprocess.call([sys.executable, "-m", "lmzoo.evaluation.compare", str(cfg_file)], stdout=logf,
                                         stderr=subprocess.STDOUT)
            else:
                rc = run_worker(cfg_file)
            if rc in (130, 143):  # the worker saved its run and stopped on a signal: stop too, with its code
                raise Interrupted(f"compare interrupted during {label}; rerun the same command to resume", rc)
            if rc != 0 or not (run_dir / RESULT).is_file():
                logfile = run_dir / "train.log"
                tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] if logfile.is_file() else []
                failed.append(f"{label}: {tail[0] if tail else f'exit code {rc}'}")
                log(f"compare: {label} failed (see {run_dir / 'train.log'})")
                continue
        rows.append({"run": name, "seed": seed, **summarize_run(run_dir, exp.get("target_loss"))})
    table = build_table(exp, rows)
    atomic_write_text(out_dir / "table.json", json.dumps(table, indent=2, default=str))
    atomic_write_text(out_dir / "table.md", table_markdown(table))
    if rows:
        plot_curves(exp, out_dir)
    if failed:
        raise LmzooError(f"{len(failed)} run(s) failed: " + "; ".join(failed))
    return table


if __name__ == "__main__":  # the per-run worker: python -m lmzoo.evaluation.compare RUN.json
    try:
        sys.exit(run_worker(sys.argv[1]))
    except LmzooError as e:
        print(f"lmzoo: error: {e}", file=sys.stderr)
        sys.exit(2)
