"""``lmzoo train --nproc N``: start N training processes with torchrun (docs/distributed.md).

The command re-runs itself as ``python -m torch.distributed.run --standalone --nproc_per_node N
-m lmzoo train <the same settings>``: rendezvous, worker start-up, and stopping every worker when one
fails are torchrun's. Before starting anything, the layout is checked here once (world size vs
batch, tensor-parallel degree vs heads, pipeline stages vs layers), so a bad layout is one line and
exit code 2, not N copies of it inside torchrun's failure report.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from lmzoo.errors import ConfigError


def check(cfg: Any, nproc: int) -> None:
    """Raise a one-line ConfigError when ``nproc`` processes cannot run ``cfg``'s parallel layout."""
    from lmzoo.distributed import ParallelConfig, check_layout
    from lmzoo.models import preset_config
    from lmzoo.train.config import accumulation_steps

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    pc = ParallelConfig.from_dict(cfg.parallel)
    model_config = preset_config(cfg.model, **cfg.model_args)  # an unknown preset is a one-line error here
    if pc.mode == "pp" and nproc > 1:
        from lmzoo.distributed.pipeline import check_family
        from lmzoo.models import PRESETS

        check_family(PRESETS[cfg.model][0], model_config)
    check_layout(pc, nproc, cfg.batch_size, cfg.global_batch, model_config)
    if cfg.global_batch:
        accumulation_steps(cfg.global_batch, cfg.batch_size, nproc if pc.data_parallel else 1)


def worker_argv(argv: list[str]) -> list[str]:
    """The ``lmzoo train`` arguments each worker gets: the same settings, without ``--nproc``."""
    out, skip = [], False
    for a in argv[1:] if argv[:1] == ["train"] else argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return ["train", *out]


def launch(nproc: int, argv: list[str]) -> int:
    """Run torchrun with ``nproc`` workers of ``lmzoo <argv>`` (layout checked first by :func:`check`); its
    exit code, explained."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmzoo", *argv]
    print(f"lmzoo: starting {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    try:
        rc = subprocess.run(cmd).returncode
    except KeyboardInterrupt:  # torchrun got the same signal and stops its workers
        return 130
    if rc != 0:  # not a usage error (those were caught above): exit 1, one line after torchrun's report
        print(f"lmzoo: error: distributed training failed (torchrun exit code {rc}); the report above names the "
              "first failed rank (a rank that dies makes the others fail within parallel.timeout_s)", file=sys.stderr)
        return 1
    return 0
