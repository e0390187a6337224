"""Shared building blocks, one concept per file: norms, RoPE, attention, MLPs."""
