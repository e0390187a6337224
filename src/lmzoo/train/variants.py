"""Variants a training run switches on by config, applied from outside the model it builds.

``multi_token: n`` (n > 1) wraps the model in :class:`~lmzoo.models.mtp.MultiTokenLM` (n output heads,
docs/multi-token-prediction.md); ``bitnet: b1 | b1.58`` rewrites the attention and MLP
projections into BitLinear (:func:`lmzoo.quant.bitnet.convert`, docs/bitnet.md). Both are plain
fields of :class:`~lmzoo.train.TrainConfig`, so ``lmzoo train --multi_token=4`` and a ``lmzoo
compare`` run ``{name: mtp4, model: gpt2-char-cpu, multi_token: 4}`` compare them with the
unchanged model at equal budget.

The order is the one :func:`lmzoo.load` rebuilds a checkpoint in (heads first, then the layer
rewrite over the whole model, the extra heads included), so a run's checkpoints load as the model
that was trained.
"""

from __future__ import annotations

from typing import Any

from lmzoo.errors import ConfigError
from lmzoo.models.base import LanguageModel

_PARALLEL_OK = ("none", "ddp")  # modes that run the model as it is (one replica per process)


def check_variants(multi_token: int, bitnet: str, parallel: dict[str, Any], family: str | None = None,
                   model_cfg: Any = None) -> None:
    """Refuse what the variants cannot run under (one line each).

    With the model's ``family`` and config, also the models a variant cannot wrap, before any data
    is prepared: multi-token heads need a Transformer with a full KV cache (:class:`~lmzoo.models.mtp.MultiTokenLM`
    refuses Mamba, Jamba, Transformer-XL, linear / Infini-attention and KV sharing: their checkpoints
    could not decode). The check builds the model on the meta device (shapes only, nothing allocated)."""
    mode = (parallel or {}).get("mode", "none")
    used = [name for name, on in (("multi_token", multi_token > 1), ("bitnet", bitnet != "off")) if on]
    if used and mode not in _PARALLEL_OK:
        raise ConfigError(f"{' and '.join(used)} run only with parallel.mode none or ddp, not {mode!r}")
    if multi_token > 1 and family is not None and model_cfg is not None:
        from lmzoo.memguard import MetaWithoutInit
        from lmzoo.models import build_model
        from lmzoo.models.mtp import MultiTokenLM

        with MetaWithoutInit():  # shapes only, initializers skipped (plain meta init costs seconds)
            MultiTokenLM(build_model(family, model_cfg), n_future=multi_token)


def apply_variants(model: LanguageModel, multi_token: int, bitnet: str) -> LanguageModel:
    """``model`` with the configured variants (the same object when none is on)."""
    if multi_token > 1:
        from lmzoo.models.mtp import MultiTokenLM

        model = MultiTokenLM(model, n_future=multi_token)
    if bitnet != "off":
        from lmzoo.quant import bitnet as bn

        bn.convert(model, variant=bitnet)
    return model


def variants_of(model: LanguageModel) -> dict[str, Any]:
    """The variants ``model`` carries, as :func:`apply_variants`' arguments."""
    quant = getattr(model, "quantization", None) or {}
    return {"multi_token": int(getattr(model, "n_future", 1) or 1),
            "bitnet": quant.get("variant", "off") if quant.get("method") == "bitnet" else "off"}


def saved_variants(settings: dict[str, Any]) -> dict[str, Any]:
    """The variants a checkpoint records (its config's ``lmzoo`` settings), as :func:`variants_of`."""
    mtp, quant = settings.get("multi_token") or {}, settings.get("quantization") or {}
    return {"multi_token": int(mtp.get("n_future", 1)) if isinstance(mtp, dict) else 1,
            "bitnet": quant.get("variant", "off") if isinstance(quant, dict) and quant.get("method") == "bitnet"
            else "off"}
