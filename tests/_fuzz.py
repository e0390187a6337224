"""The settings every hypothesis fuzzer of the suite shares: a fresh seed each run, so that each CI run tries
new cases rather than the same ones, printed in the test session's header (rerun a failure with
``LMZOO_FUZZ_SEED=<seed>``; hypothesis also prints the shrunk case and a ``@reproduce_failure`` blob)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

FUZZ_SEED = int(os.environ.get("LMZOO_FUZZ_SEED") or secrets.randbits(32))


def fuzz(max_examples: int) -> Callable:
    """Decorator, above ``@given``: ``max_examples`` cases drawn from :data:`FUZZ_SEED`, no deadline (a shared
    machine's pauses are not failures), no example database (each run stands alone)."""
    from hypothesis import HealthCheck, seed, settings

    def apply(test: Callable) -> Callable:
        return settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                        print_blob=True, database=None)(seed(FUZZ_SEED)(test))

    return apply
