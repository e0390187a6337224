"""Every table in README.md, RESULTS.md and docs/ either quotes a stored run or says why it is not a
measurement, and a quoted run's file exists and holds the table's numbers.

A measured table is followed (before the next table or heading) by one line per stored file::

    Source: [results/<file>](../results/<file>), written by `<command>` on <YYYY-MM-DD> (<machine>).

(``Source (which rows): ...`` where a file holds only some of the rows.)

The file must exist; where it starts with a header naming its command (benchmarks/record.py writes one;
``lmzoo compare`` stores it in compare.json), that command is the one quoted; the command must name a
script under benchmarks/ or an ``lmzoo`` subcommand; and every number of two or more significant digits
in the table's cells (the first column, the row labels, aside) must be in the file (up to the table's
rounding, after a unit change: %, k/M, KiB..GiB, ms/us). A table that is not a measurement (options,
name mappings, formulas, what a test asserts) is preceded by ``<!-- not measured: <why> -->``; tables
the code computes are checked against the code at the end of this file.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "RESULTS.md", *(ROOT / "docs").glob("*.md")])
SOURCE = re.compile(r"^Source(?: \([^)]*\))?: .*?\[[^\]]*\]\((?:\.\./)?(results/[^)\s]+)\)"  # the stored file
                    r".*?`([^`]+)`.*?(\d{4}-\d{2}-\d{2})")  # the command, the date
NOT_MEASURED = re.compile(r"^<!-- not measured: \S.*-->$")
NUMBER = re.compile(r"(?<![\w.\-/])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.]*[a-df-zA-DF-Z_])")
# unit changes between a stored value and the table: percent, thousands/millions, binary sizes, time
SCALES = (1.0, 100.0, 1e-2, 1e-3, 1e3, 1e-6, 1e6, 1e-9, 1e9, 2.0**-10, 2.0**-20, 2.0**-30, 2.0**10, 2.0**20)


def tables(page: Path) -> list[tuple[int, list[str], list[str], list[str]]]:
    """(line number, the lines before it, the table's lines, the lines after it up to the next table or
    heading) for each Markdown table outside code blocks."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i, fence = [], 0, False
    while i < len(lines):
        if lines[i].startswith("```"):
            fence = not fence
        if not fence and lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            k = j
            while k < len(lines) and not lines[k].startswith(("|", "#")):
                k += 1
            out.append((i + 1, lines[max(0, i - 3) : i], lines[i:j], lines[j:k]))
            i = j
            continue
        i += 1
    return out


def numbers(text: str) -> list[tuple[float, int]]:
    """(value, decimals shown) of every number in ``text``, thousands separators removed; the typographic
    minus (U+2212) is a minus sign."""
    found = []
    for m in NUMBER.finditer(text.replace("\u2212", "-")):
        s = m.group(0).replace(",", "")
        try:
            v = float(s)
        except ValueError:
            continue
        decimals = len(s.split(".")[1].split("e")[0]) if "." in s and "e" not in s else 0
        found.append((v, decimals))
    return found


def significant(s: float) -> int:
    digits = f"{abs(s):.10g}".replace(".", "").replace("-", "").lstrip("0")
    return len(digits.split("e")[0])


def stored_numbers(path: Path) -> list[float]:
    text = path.read_text(encoding="utf-8")
    return [float(m.group(0)) for m in re.finditer(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]


def holds(stored: list[float], value: float, decimals: int) -> bool:
    tol = 0.5 * 10.0**-decimals * (1 + 1e-9) + 1e-12
    return any(abs(y * f - value) <= tol for y in stored for f in SCALES)


def header_command(path: Path) -> str | None:
    """The command a stored file says wrote it: a record header (benchmarks/record.py) or compare.json."""
    compare = path.parent / "compare.json"
    if compare.is_file():
        return json.loads(compare.read_text()).get("command")
    try:
        first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    except (ValueError, IndexError):
        return None
    return first.get("command") if isinstance(first, dict) and first.get("record") == "header" else None


CASES = [(page, line, before, table, after) for page in PAGES for line, before, table, after in tables(page)]


@pytest.mark.parametrize("page,line,before,table,after", CASES,
                         ids=[f"{c[0].relative_to(ROOT)}:{c[1]}" for c in CASES])
def test_every_table_quotes_a_stored_run_or_says_it_is_not_measured(page, line, before, table, after):
    marked = any(NOT_MEASURED.match(x.strip()) for x in before)
    sources = [m for m in (SOURCE.match(x.strip()) for x in after) if m]
    assert marked or sources, (f"{page.relative_to(ROOT)}:{line}: a table needs a 'Source: [results/...](...)' "
                               "line naming the command and date, or <!-- not measured: why -->")
    if marked:
        return
    stored: list[float] = []
    for m in sources:
        path, command, _ = m.groups()
        f = ROOT / path
        assert f.is_file(), f"{page.relative_to(ROOT)}:{line}: {path} does not exist"
        argv = shlex.split(command)
        assert (argv[:1] == ["lmzoo"] or (argv[:1] == ["python"] and argv[1:2]
                and (ROOT / argv[1]).is_file() and argv[1].startswith("benchmarks/"))), command
        written_by = header_command(f)
        if written_by is not None:
            assert " ".join(written_by.split()) == " ".join(command.split()), (path, written_by, command)
        stored += stored_numbers(f)
    cells = "\n".join(" | ".join(row.strip().strip("|").split("|")[1:]) for row in table[2:])  # not the row labels
    missing = [f"{v:g}" for v, d in numbers(cells) if significant(v) >= 2 and not holds(stored, v, d)]
    assert not missing, f"{page.relative_to(ROOT)}:{line}: not in the stored run: {', '.join(missing)}"


# -- tables the code computes (marked "not measured"): checked against the code itself ------------------------

def _rows(page: str, header_start: str) -> list[list[str]]:
    """The body rows of the table in ``page`` whose header starts with ``header_start``, as stripped cells."""
    (table,) = [t for _, _, t, _ in tables(ROOT / page) if t[0].startswith(header_start)]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in table[2:]]


def _int(cell: str) -> int:
    return int(cell.split()[0].replace(",", "").replace("−", "-").replace("+", ""))


def _meta_model(preset: str, **overrides):
    import lmzoo
    from lmzoo.memguard import MetaWithoutInit

    with MetaWithoutInit():  # shapes only: any size in milliseconds
        return lmzoo.build(preset, **overrides)


def test_the_preset_table_counts_what_the_presets_build():
    rows = _rows("docs/gpt2.md", "| preset | n_layer |")
    assert len(rows) >= 10
    for row in rows:
        m = _meta_model(row[0].strip("`"))
        assert (m.num_params(), m.num_params(non_embedding=True)) == (_int(row[-2]), _int(row[-1])), row[0]


def test_the_one_field_at_a_time_table_counts_what_each_field_builds():
    base = _meta_model("gpt2").num_params()
    rows = _rows("docs/gpt2.md", "| field | what changes |")
    assert len(rows) == 5
    for field, _, params, delta in rows:
        key, _, value = field.strip("`").partition("=")
        value = int(value) if value.isdigit() else {"False": False, "True": True}.get(value, value.strip('"'))
        n = _meta_model("gpt2", **{key: value}).num_params()
        assert (n, n - base) == (_int(params), _int(delta)), field


def test_the_kv_cache_table_is_the_caches_size():
    import torch

    rows = _rows("docs/gqa.md", "| preset | L | H | G |")
    for preset, *_, f32, bf16, mib in rows:
        m = _meta_model(preset.strip("`"))
        per_token = {dtype: m.init_cache(1, 1024, dtype=dtype, device="meta").nbytes / 1024
                     for dtype in (torch.float32, torch.bfloat16)}
        assert (per_token[torch.float32], per_token[torch.bfloat16]) == (_int(f32), _int(bf16)), preset
        assert per_token[torch.float32] * 1024 / 2**20 == _int(mib), preset
