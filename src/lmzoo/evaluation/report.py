"""``lmzoo report``: the project's experiment log (RESULTS.md) rendered from stored run summaries.

Each experiment is a directory written by ``lmzoo compare`` (or its small, committable subset under
``results/<name>/``: ``compare.json``, ``table.json`` and the PNGs). One section per experiment:
its title and description, the command that reproduces it, the machine and date it ran on, the
budget, the table and the plots. A directory with a ``section.json`` holds stored benchmark outputs
instead (benchmarks/record.py files, e.g. ``results/real-models/``): one subsection per file, with its
command, machine, wall time, table and reading (:func:`render_benchmarks`). Rendering reads only those
files, so the same summaries always give the same page: ``tests/test_report.py`` regenerates RESULTS.md
and checks it matches the committed file (never edit RESULTS.md by hand: rerun the command at its top).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lmzoo.config import loads_json, read_json
from lmzoo.errors import ConfigError, DataError
from lmzoo.evaluation.compare import PLOTS, table_markdown
from lmzoo.formats.atomic import atomic_write_text

SUMMARY_FILES = ("compare.json", "table.json", "table.md", *PLOTS.values())


def read_experiment(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(compare.json, table.json) of an experiment directory, with one-line errors."""
    d = Path(directory)
    out = []
    for name in ("compare.json", "table.json"):
        f = d / name
        if not f.is_file():
            raise DataError(f"{d}: no {name} (expected the output directory of `lmzoo compare`)")
        out.append(read_json(f, DataError, mapping=False))
    return out[0], out[1]


def export(compare_dir: str | Path, results_dir: str | Path = "results") -> Path:
    """Copy an experiment's summaries (not its checkpoints) to ``results_dir/<name>/`` for committing."""
    meta, _ = read_experiment(compare_dir)
    dest = Path(results_dir) / meta["name"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in SUMMARY_FILES:
        if (Path(compare_dir) / name).is_file():
            shutil.copyfile(Path(compare_dir) / name, dest / name)
    return dest


def _machine_line(m: dict[str, Any]) -> str:
    parts = [m.get("gpu") or f"CPU {m.get('cpu', '?')} ({m.get('cpus', '?')} cores)", m.get("platform", ""),
             f"Python {m.get('python', '?')}", f"torch {m.get('torch', '?')}"]
    return ", ".join(p for p in parts if p)


def render_section(directory: str | Path, out_dir: str | Path) -> str:
    """The Markdown section of one experiment; plot links are relative to ``out_dir`` (where the page lives)."""
    d = Path(directory)
    meta, table = read_experiment(d)
    budget = ", ".join(f"{k} = {v:,}" if isinstance(v, (int, float)) else f"{k} = {v}"
                       for k, v in table.get("budget", {}).items())
    seeds = meta.get("experiment", {}).get("seeds", [])
    lines = [f"## {meta.get('title') or meta['name']}", ""]
    if meta.get("description"):
        lines += [meta["description"].strip(), ""]
    command = meta.get("command") or f"lmzoo compare  # {meta['name']}"
    machine = _machine_line(meta.get("machine", {}))
    lines += ["Reproduce:", "", "```", command, "```", ""]
    lines += [f"Machine: {machine}; run on {meta.get('date', '?')}.  "]
    lines += [f"Budget: {budget} per run; seeds {', '.join(map(str, seeds)) or '?'}.", ""]
    rel = Path(os.path.relpath(d, out_dir)).as_posix()
    lines += [table_markdown(table).rstrip(), ""]
    # the line tests/test_docs_figures.py checks: the stored table this one is rendered from, and its command
    lines += [f"Source: [{rel}/table.json]({rel}/table.json), written by `{command}` on {meta.get('date', '?')} "
              f"({machine}).", ""]
    plots = [(axis, name) for axis, name in PLOTS.items() if (d / name).is_file()]
    if plots:
        lines += [" ".join(f"![val loss vs {axis}]({rel}/{name})" for axis, name in plots), ""]
    return "\n".join(lines)


BENCH_SECTION = "section.json"  # a directory of stored benchmark outputs (benchmarks/record.py), not a comparison


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a stored benchmark output, with one-line errors."""
    if not path.is_file():
        raise DataError(f"{path}: no such stored benchmark output")
    rows = [loads_json(line, f"{path}:{n}", DataError)
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    return [r for r in rows if isinstance(r, dict)]


def _markdown_table(table: dict[str, Any]) -> list[str]:
    cols = table["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("—" if c is None else str(c) for c in row) + " |" for row in table["rows"]]
    return lines


def render_benchmarks(directory: str | Path, out_dir: str | Path) -> str:
    """The Markdown section of a directory of stored benchmark outputs: ``section.json`` names the title, a
    description and the experiments (``file``, ``title``, ``reading``), in order; each file is a
    benchmarks/record.py output (header with the command, date and machine, the benchmark's JSON lines, the
    footer with the wall time) whose ``{"table": {"columns", "rows"}}`` lines are the tables shown."""
    d = Path(directory)
    meta = read_json(d / BENCH_SECTION, DataError)
    rel = Path(os.path.relpath(d, out_dir)).as_posix()
    lines = [f"## {meta['title']}", ""]
    if meta.get("description"):
        lines += [meta["description"].strip(), ""]
    for exp in meta["experiments"]:
        records = read_records(d / exp["file"])
        head = next((r for r in records if r.get("record") == "header"), None)
        tables = [r["table"] for r in records if isinstance(r.get("table"), dict)]
        if head is None or not tables:
            raise DataError(f"{d / exp['file']}: expected a benchmarks/record.py output with a table line")
        foot = next((r for r in records if r.get("record") == "footer"), {})
        machine = f"{head.get('machine', '?')}, torch {head.get('torch', '?')}"
        load = ", ".join(f"{x:g}" for x in head.get("load_avg", []))
        lines += [f"### {exp['title']}", ""]
        if exp.get("reading"):
            lines += [exp["reading"].strip(), ""]
        lines += ["Reproduce:", "", "```", head["command"], "```", ""]
        lines += [f"Machine: {machine} ({head.get('note') or 'no note'}); run on {head.get('date', '?')} "
                  f"in {foot.get('wall_s', '?')} s; load average at the start {load or '?'}.", ""]
        for t in tables:  # each table with the line tests/test_docs_figures.py checks
            lines += [*_markdown_table(t), ""]
            lines += [f"Source: [{rel}/{exp['file']}]({rel}/{exp['file']}), written by `{head['command']}` on "
                      f"{head.get('date', '?')} ({machine}).", ""]
    return "\n".join(lines)


def render(dirs: list[str | Path], out: str | Path) -> str:
    """The whole page for experiment directories ``dirs`` (in the order given), to be written at ``out``."""
    if not dirs or any(not str(d) for d in dirs):
        raise DataError("report: give at least one experiment directory (and no empty path)")
    out_dir = Path(out).parent
    rel = [Path(os.path.relpath(d, out_dir)).as_posix() for d in dirs]
    head = [
        "# lmzoo results",
        "",
        "Generated by `lmzoo report` from the stored run summaries; do not edit by hand. Regenerate with:",
        "",
        "```",
        f"lmzoo report {' '.join(rel)} --out {Path(out).name}",
        "```",
        "",
        "Each section names the command that reran its experiment and the machine it ran on. Figures "
        "from shared CPUs are noisy: compare rows within a section, not across machines.",
        "",
    ]
    body = [render_benchmarks(d, out_dir) if (Path(d) / BENCH_SECTION).is_file() else render_section(d, out_dir)
            for d in dirs]
    return "\n".join(head) + "\n" + "\n".join(body).rstrip() + "\n"


def default_report_path(dirs: list[str | Path]) -> Path:
    """Where ``lmzoo report`` writes without ``--out``: ``report.md`` inside the one experiment directory
    given; several directories need ``--out`` (the project's RESULTS.md is only ever written when named)."""
    if len(dirs) != 1:
        raise ConfigError(f"report: {len(dirs)} experiment directories: name the page to write with --out FILE.md")
    return Path(dirs[0]) / "report.md"


def write_report(dirs: list[str | Path], out: str | Path) -> Path:
    """Render and write the page atomically; returns its path."""
    text = render(dirs, out)
    atomic_write_text(Path(out), text)
    return Path(out)
