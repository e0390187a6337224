"""Model families and their presets.

Each family lives in its own file with its config class, ``PRESETS`` and model class (a
:class:`~lmzoo.models.base.LanguageModel`), and is registered here, in :data:`REGISTERED`: the one
place a new family is added. ``build("gpt2", n_layer=6)`` builds a preset with overrides.
"""

from __future__ import annotations

from typing import Any

from lmzoo.config import Config
from lmzoo.errors import ConfigError, suggest
from lmzoo.models import gpt2, jamba, llama, mamba, transformer_xl
from lmzoo.models.base import LanguageModel, LMOutput

# the families: (model class, its presets); a class's ``family`` is its registry name
REGISTERED: tuple[tuple[type[LanguageModel], dict[str, dict[str, Any]]], ...] = (
    (gpt2.GPT, gpt2.PRESETS),
    (llama.Llama, llama.PRESETS),
    (transformer_xl.TransformerXL, transformer_xl.PRESETS),
    (mamba.Mamba, mamba.PRESETS),
    (jamba.Jamba, jamba.PRESETS),
)
FAMILIES: dict[str, type[LanguageModel]] = {cls.family: cls for cls, _ in REGISTERED}
# preset name -> (family, settings)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (cls.family, settings) for cls, presets in REGISTERED for name, settings in presets.items()
}


def family_class(name: str) -> type[LanguageModel]:
    if not isinstance(name, str) or name not in FAMILIES:  # a config.json may hold anything here
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}"
                          + suggest(str(name), FAMILIES))
    return FAMILIES[name]


def preset_config(preset: str, **overrides: Any) -> Config:
    """The config of a preset with ``overrides`` applied (validated)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}" + suggest(preset, PRESETS) + "; see `lmzoo info --list`")
    family, settings = PRESETS[preset]
    return family_class(family).config_class.from_dict({**settings, **overrides})


def config_from_dict(d: dict[str, Any]) -> tuple[str, Config]:
    """Read a saved ``{"family": ..., **fields}`` dict back into (family, Config)."""
    d = dict(d)
    family = d.pop("family", None)
    if family is None:
        raise ConfigError("config has no 'family' key")
    return family, family_class(family).config_class.from_dict(d)


def config_to_dict(model_or_family: LanguageModel | str, config: Config | None = None) -> dict[str, Any]:
    if isinstance(model_or_family, LanguageModel):
        return {"family": model_or_family.family, **model_or_family.config.to_dict()}
    return {"family": model_or_family, **config.to_dict()}


def build_model(family: str, config: Config) -> LanguageModel:
    return family_class(family)(config)


def build(preset: str, **overrides: Any) -> LanguageModel:
    """Build a freshly initialized model from a preset name and field overrides."""
    cfg = preset_config(preset, **overrides)
    return build_model(PRESETS[preset][0], cfg)


__all__ = ["FAMILIES", "PRESETS", "LMOutput", "LanguageModel", "build", "build_model", "preset_config"]
