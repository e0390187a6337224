"""RESULTS.md is generated from the stored run summaries in results/, never edited by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmzoo.cli.app import main
from lmzoo.errors import DataError
from lmzoo.evaluation.report import render

ROOT = Path(__file__).resolve().parents[1]


def test_results_md_matches_a_regeneration_from_the_stored_summaries():
    # comparisons (table.json) and directories of stored benchmark outputs (section.json)
    dirs = sorted(p.relative_to(ROOT) for p in (ROOT / "results").iterdir()
                  if (p / "table.json").is_file() or (p / "section.json").is_file())
    assert dirs, "no stored experiment summaries under results/"
    committed = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    regenerated = render([ROOT / d for d in dirs], ROOT / "RESULTS.md")
    assert regenerated == committed, "RESULTS.md is stale: run the `lmzoo report` command at its top"
    compares = [d for d in dirs if (ROOT / d / "table.json").is_file()]
    for d in compares:  # every comparison says how to reproduce it, and its plots exist
        assert f"![val loss vs tokens]({d.as_posix()}/val_loss_vs_tokens.png)" in committed
        assert (ROOT / d / "val_loss_vs_tokens.png").is_file()
    lines = committed.splitlines()
    for d in compares:  # the command that reproduces it, on a line of its own and in its Source line
        command = f"lmzoo compare --config recipes/compare/{d.name}.yaml"
        assert command in lines and f"written by `{command}`" in committed, d


def test_report_of_a_directory_without_summaries_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(DataError, match="compare.json"):
        render([tmp_path], tmp_path / "R.md")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "R.md")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
