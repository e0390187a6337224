"""A ``LightningModule`` around any lmzoo model, so it trains under ``lightning.Trainer``.

lmzoo's own trainer (lmzoo.train) is the reference loop; this wrapper is for people whose tooling
is Lightning's (callbacks, loggers, strategies). It adds no modelling: ``training_step`` calls the
model's ``forward(idx, targets)`` contract and logs its loss and auxiliary terms (e.g. MoE balance),
and ``configure_optimizers`` uses lmzoo's AdamW parameter groups (no decay on norms, biases and
embeddings) with the same warm-up + cosine schedule as lmzoo.train.

    from lmzoo.integrations.lightning import LMModule, token_dataloader
    module = LMModule(lmzoo.build("gpt2-debug", vocab_size=65), lr=1e-3, max_steps=100)
    lightning.Trainer(max_steps=100).fit(module, token_dataloader("data/shakespeare-char", 32, 8))

Needs ``pip install 'lmzoo[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lmzoo.errors import ConfigError

try:
    import lightning as L
except ImportError:  # the wrapper is optional: say what to install when it is used
    L = None


def _require() -> None:
    if L is None:
        raise ConfigError("the Lightning integration needs the lightning package: pip install 'lmzoo[lightning]'")


class _TokenBatches(torch.utils.data.IterableDataset):
    """Endless (x, y) batches of a prepared split (lmzoo.data.TokenLoader), already batched."""

    def __init__(self, data_dir: str, split: str, block_size: int, batch_size: int, seed: int):
        self.args = (data_dir, split, block_size, batch_size, seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from lmzoo.data import TokenLoader

        data_dir, split, block_size, batch_size, seed = self.args
        loader = TokenLoader(data_dir, split, block_size, batch_size, seed=seed)
        while True:
            yield loader.next_batch()


def token_dataloader(data_dir: str, block_size: int, batch_size: int, split: str = "train",
                     seed: int = 1337) -> torch.utils.data.DataLoader:
    """A DataLoader of (x, y) batches, (batch_size, block_size) each, from an ``lmzoo prepare`` directory."""
    return torch.utils.data.DataLoader(_TokenBatches(data_dir, split, block_size, batch_size, seed), batch_size=None)


_Base = L.LightningModule if L is not None else torch.nn.Module


class LMModule(_Base):
    """Lightning wrapper: ``batch = (x, y)`` token tensors; the loss is the model's own."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, min_lr: float | None = None,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.99), warmup_steps: int = 100,
                 max_steps: int = 2000):
        _require()
        super().__init__()
        self.model = model
        self.lr, self.min_lr = lr, lr / 10 if min_lr is None else min_lr
        self.weight_decay, self.betas = weight_decay, betas
        self.warmup_steps, self.max_steps = warmup_steps, max_steps

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        return self.model(idx, targets)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> torch.Tensor:
        x, y = batch
        out = self.model(x, y)
        self.log(f"{prefix}/loss", out.loss, prog_bar=True, on_step=prefix == "train", on_epoch=prefix != "train")
        for k, v in (out.aux or {}).items():  # MoE router terms etc.
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                self.log(f"{prefix}/{k}", v.detach().float())
        return out.loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        from lmzoo.train.optimizers import make_adamw
        from lmzoo.train.schedule import lr_at

        opt = make_adamw(self.model, self.lr, self.betas, self.weight_decay, 1e-8, False)

        def factor(step: int) -> float:  # LambdaLR multiplies the base lr: the schedule divided by lr
            return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup=self.warmup_steps, total=self.max_steps,
                         schedule="cosine", decay_frac=0.2) / self.lr

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
