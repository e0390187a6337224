"""Measuring models: perplexity and accuracy (:mod:`.evaluate`), equal-budget comparisons
(:mod:`.compare`), the experiment log (:mod:`.report`), scaling laws (:mod:`.scaling`) and speed
(:mod:`.bench`)."""
