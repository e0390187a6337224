"""The family pages' computed tables (docs/llama.md, docs/jamba.md) say what the code builds: every preset of
the family is listed with its shape and its parameter counts, and the Llama decoding-state table gives the
sizes ``init_cache`` allocates. Built on the meta device: no memory allocated."""

from __future__ import annotations

import pytest
import torch

from lmzoo.models import PRESETS
from test_docs_figures import _int, _meta_model, _rows

PAGES = {"llama": "docs/llama.md", "jamba": "docs/jamba.md"}
SHAPE = ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "block_size", "vocab_size")


@pytest.mark.parametrize("family", PAGES)
def test_the_preset_table_lists_every_preset_with_its_shape_and_counts(family):
    rows = _rows(PAGES[family], "| preset | n_layer |")
    listed = [row[0].strip("`") for row in rows]
    assert sorted(listed) == sorted(p for p, (fam, _) in PRESETS.items() if fam == family)
    for row in rows:
        m = _meta_model(row[0].strip("`"))
        cfg = m.config
        shape = [getattr(cfg, "hidden", None) or cfg.mlp_hidden if f == "mlp_hidden" else getattr(cfg, f)
                 for f in SHAPE]
        assert [_int(c) for c in row[1:8]] == shape, row[0]
        assert (m.num_params(), m.active_params()) == (_int(row[-2]), _int(row[-1])), row[0]


def test_the_llama_state_table_is_what_init_cache_allocates():
    rows = _rows(PAGES["llama"], "| preset | state |")
    assert len(rows) >= 4
    for preset, state, per_token, at_4k, at_32k in rows:
        m = _meta_model(preset.strip("`"))
        caches = {n: m.init_cache(1, n, dtype=torch.bfloat16, device="meta") for n in (4096, 32768)}
        assert type(caches[4096]).__name__ == state.split(",")[0].strip("`"), preset
        for n, cell in ((4096, at_4k), (32768, at_32k)):
            assert caches[n].nbytes / 2**30 == float(cell.split()[0]), (preset, n)
        if per_token.endswith("KiB"):
            assert caches[4096].nbytes / 4096 / 1024 == _int(per_token), preset
