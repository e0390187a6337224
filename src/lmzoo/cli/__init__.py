"""The ``lmzoo`` command line: one module a group of verbs, each calling library functions.

- :mod:`.app`: the parser, the dispatch and the one-line error convention (exit code 2);
- :mod:`.info`: ``lmzoo info``; :mod:`.bench`: ``lmzoo bench``; :mod:`.dist`: ``--nproc`` (torchrun).
"""

from lmzoo.cli.app import main

__all__ = ["main"]
