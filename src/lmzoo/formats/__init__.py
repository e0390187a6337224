"""Files in and out: lmzoo checkpoints, Hugging Face directories, and the write-then-rename helpers.

- :mod:`.checkpoint`: lmzoo checkpoints and run directories (``save``, ``load``);
- :mod:`.hf`: Hugging Face ``transformers`` directories both ways, one converter per family;
- :mod:`.tensors`: weight files (safetensors, sharded indexes, torch ``.bin`` read safely), digests;
- :mod:`.atomic`: crash-safe writes (temporary name, then rename).

Nothing is imported here, so any of them can be imported alone.
"""
