"""A tiny byte-level model trained in seconds, shared by the eval, chat and serve tests.

It learns three sentences by heart, so tests can ask it for a known answer ("the cat says" ->
" meow."). Built once per test session (module-level cache), in a directory the caller gives.
"""

from __future__ import annotations

from pathlib import Path

SENTENCES = "the cat says meow. the dog says woof. the cow says moo.\n"
_CACHE: dict[str, Path] = {}


def tiny_run(root: Path) -> Path:
    """A run directory with a checkpoint of gpt2-debug (byte tokenizer) that knows SENTENCES."""
    if "run" in _CACHE:
        return _CACHE["run"]
    # not lmzoo.train(...): once any lmzoo.train.* module is imported, the attribute is that subpackage
    from lmzoo.train import train

    root.mkdir(parents=True, exist_ok=True)
    text = root / "animals.txt"
    text.write_text(SENTENCES * 400)
    out = root / "run"
    train(
        model="gpt2-debug", source=str(text), tokenizer="byte", data_dir=str(root / "data"), out_dir=str(out),
        max_steps=150, batch_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=10, eval_interval=0, eval_iters=2,
        progress=False, sample_tokens=0, threads=1, seed=0,
    )
    _CACHE["run"] = out
    return out
