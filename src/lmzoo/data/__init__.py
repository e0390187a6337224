"""Corpora -> token files -> batches: ``prepare`` a source once, then read it with ``TokenLoader``.

See docs/data.md.
"""

from lmzoo.data.loader import TokenLoader
from lmzoo.data.prepare import is_val_document, load_meta, prepare
from lmzoo.data.sources import BUILTINS, Source, open_source

__all__ = ["BUILTINS", "Source", "TokenLoader", "is_val_document", "load_meta", "open_source", "prepare"]
