"""Optional integrations with other training stacks (each needs its own extra, e.g. ``lmzoo[lightning]``)."""
