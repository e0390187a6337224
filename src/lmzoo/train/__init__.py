"""Training: the shared trainer, its config, optimizers, schedules and metrics."""

import sys
import types

from lmzoo.train.config import TrainConfig
from lmzoo.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]


class _CallableModule(types.ModuleType):
    """``lmzoo.train(...)`` is the public training call, and ``lmzoo.train`` is also this package:
    once the package is imported it replaces the function attribute on ``lmzoo``, so the package
    itself forwards calls to :func:`train`."""

    def __call__(self, cfg=None, **overrides):
        return train(cfg, **overrides)


sys.modules[__name__].__class__ = _CallableModule
