"""The Lightning wrapper: any lmzoo model trains under lightning.Trainer (fast_dev_run on CPU)."""

from __future__ import annotations

import pytest

L = pytest.importorskip("lightning", reason="needs lightning (pip install 'lmzoo[lightning]')")

import lmzoo  # noqa: E402
from lmzoo.integrations.lightning import LMModule, token_dataloader  # noqa: E402


@pytest.mark.parametrize("preset", ["gpt2-debug", "mamba-debug"])
def test_fast_dev_run_trains_an_lmzoo_model(shakespeare_data, preset, tmp_path):
    model = lmzoo.build(preset, vocab_size=65)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = LMModule(model, lr=1e-2, warmup_steps=0, max_steps=2)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, token_dataloader(str(shakespeare_data), 32, 4),
                token_dataloader(str(shakespeare_data), 32, 4, split="val"))
    assert trainer.state.finished and "train/loss" in trainer.callback_metrics
    assert any(not (v == before[k]).all() for k, v in model.state_dict().items())  # the optimizer stepped
