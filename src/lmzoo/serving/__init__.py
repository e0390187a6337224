"""Talking to a model: the terminal chat (:mod:`.chat`) and the OpenAI-compatible HTTP server (:mod:`.serve`)."""
