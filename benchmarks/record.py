"""Run a benchmark command and store what it prints under results/, with where and when it ran.

    python benchmarks/record.py results/kv-cache-decode.jsonl -- python benchmarks/kv_cache_decode.py

The stored file is the command's standard output (JSON lines), preceded by one header line and followed
by one footer line::

    {"record": "header", "command": "python benchmarks/kv_cache_decode.py", "date": "2026-12-07",
     "machine": "AMD EPYC ... (2 CPUs)", "torch": "2.13.0+cpu", "commit": "aa0b00f", "load_avg": [...]}
    ... the benchmark's lines ...
    {"record": "footer", "wall_s": 41.2, "load_avg": [...], "returncode": 0}

Every figure quoted in the docs names such a file and the command in it (tests/test_docs_figures.py
checks both, and that the file holds the table's numbers). The output is written to a temporary name and
renamed when the command succeeds; a failed command stores nothing and returns its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``) and the number of CPUs this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({len(os.sched_getaffinity(0))} CPUs)"


def commit() -> str:
    """The checkout's commit, with ``+changes`` when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def header(command: list[str], note: str | None) -> dict:
    import torch

    return {"record": "header", "command": shlex.join(command), "date": time.strftime("%Y-%m-%d"),
            "machine": cpu_name(), "note": note, "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the file to store (results/<name>.jsonl)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command")
    p.add_argument("--note", default="2-core CPU, shared with other jobs",
                   help="what else to know about the machine (stored in the header)")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    head = header(command, args.note)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(head) + "\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            f.write(line)
        rc = proc.wait()
        f.write(json.dumps({"record": "footer", "wall_s": round(time.time() - t0, 1),
                            "load_avg": [round(x, 2) for x in os.getloadavg()], "returncode": rc}) + "\n")
    if rc != 0:
        tmp.unlink()
        print(f"record: {shlex.join(command)} exited {rc}; nothing stored", file=sys.stderr)
        return rc
    os.replace(tmp, args.out)
    print(f"record: stored {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
