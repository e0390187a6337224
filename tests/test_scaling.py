"""The scaling-law fit recovers known parameters; the depth dial and the frontier behave."""

from __future__ import annotations

import numpy as np
import pytest

from lmzoo.scaling import ScalingFit, depth_config, fit_scaling_law, isoflop_grid

TRUE = ScalingFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10


def test_fit_recovers_known_parameters_within_5_percent():
    pytest.importorskip("scipy")
    grid = isoflop_grid(np.geomspace(1e18, 1e21, 4), np.geomspace(2e7, 2e9, 5))
    n, d = (np.array(x) for x in zip(*grid, strict=True))
    rng = np.random.default_rng(0)
    loss = TRUE.loss(n, d) * np.exp(rng.normal(0, 1e-4, n.size))  # 0.01% noise
    grid = {"a": (5.0, 10.0), "b": (5.0, 10.0), "e": (0.0,), "alpha": (0.5,), "beta": (0.2, 0.5)}  # fast
    fit = fit_scaling_law(n, d, loss, grid=grid)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name


def test_frontier_spends_the_budget_and_matches_closed_form():
    c = 1e21
    n, d = TRUE.optimal(c)
    assert 6 * n * d == pytest.approx(c)
    # the optimum: nudging N either way (D = C / 6N) raises the predicted loss
    for f in (0.8, 1.25):
        assert TRUE.loss(n * f, d / f) > TRUE.loss(n, d)


def test_depth_dial_derives_width_heads_and_lr():
    small, big = depth_config(2, aspect=32, head_dim=16), depth_config(8, aspect=32, head_dim=16)
    assert (small["n_layer"], small["n_embd"], small["n_head"]) == (2, 64, 4)
    assert (big["n_layer"], big["n_embd"], big["n_head"]) == (8, 256, 16)
    assert big["lr"] == pytest.approx(small["lr"] / 2)  # width x4 -> lr / 2
