"""Run metrics: one JSON object per line in ``<run>/metrics.jsonl`` (always written).

Schema (documented in docs/training.md): every line has ``kind`` ("train", "eval" or "event"),
``step`` and ``wall_s``; train lines add loss, lr, grad_norm, tokens, tokens_per_s, step_ms;
eval lines add val_loss (and train_loss when measured).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf: keep them readable instead of invalid
    return v


class MetricsLogger:
    """Appends JSON lines; only the process that should write logs opens the file."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.start = time.time()
        self.enabled = enabled
        self._f = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self._f:
            return
        rec = {"kind": kind, "step": step, "wall_s": round(time.time() - self.start, 3)}
        rec.update({k: _clean(v) for k, v in values.items()})
        try:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
        except OSError as e:  # a full disk, a file system remounted read-only: one line naming the file
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a kill is skipped)."""
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except (ValueError, RecursionError):  # JSONDecodeError (a torn line), a line nested absurdly deep
            continue
    return out
