"""The scaling-law fit recovers known parameters; the depth dial and the frontier behave."""

from __future__ import annotations

import numpy as np
import pytest

from lmzoo.evaluation.scaling import ScalingFit, depth_config, fit_scaling_law, isoflop_grid, isoflop_plan

TRUE = ScalingFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10


def test_fit_recovers_known_parameters_within_5_percent():
    pytest.importorskip("scipy")
    grid = isoflop_grid(np.geomspace(1e18, 1e21, 4), np.geomspace(2e7, 2e9, 5))
    n, d = (np.array(x) for x in zip(*grid, strict=True))
    rng = np.random.default_rng(0)
    loss = TRUE.loss(n, d) * np.exp(rng.normal(0, 1e-4, n.size))  # 0.01% noise
    # the default starts (variable projection) and an explicit grid of starts both find it
    for fit in (fit_scaling_law(n, d, loss, starts=2),
                fit_scaling_law(n, d, loss, grid={"a": (5.0, 10.0), "b": (5.0, 10.0), "e": (0.0,), "alpha": (0.5,),
                                                  "beta": (0.2, 0.5)})):
        for name in ("E", "A", "B", "alpha", "beta"):
            assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
    # a bound on E holds (the constraint a too-small sweep needs), and costs fit quality when wrong
    fixed = fit_scaling_law(n, d, loss, starts=2, e_range=(1.2, 1.2))
    assert fixed.E == pytest.approx(1.2) and fixed.objective > 10 * fit.objective


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


def test_isoflop_plan_spends_each_budget_and_drops_too_short_or_long_runs():
    params = {1: 10_000, 2: 100_000, 3: 1_000_000}
    plan = isoflop_plan([6e9, 6e10], params, tokens_per_step=1000, min_steps=5, max_tokens=5e5)
    # 6e9: 100, 10 and 1 (dropped: < 5) steps; 6e10: 1000 (dropped: 1e6 tokens > 5e5), 100 and 10 steps
    assert [(r["depth"], r["steps"]) for r in plan] == [(1, 100), (2, 10), (2, 100), (3, 10)]
    for r in plan:
        assert 6 * r["params"] * r["tokens"] == pytest.approx(r["flops"])


def _corpus(path):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    path.write_text(" ".join(rng.choice(words, 4000)) + "\n")
    return path


def test_lmzoo_scale_runs_a_tiny_sweep_writes_fit_json_and_plot(tmp_path, capsys):
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    import json

    from lmzoo.cli.app import main

    src, out, plot = _corpus(tmp_path / "words.txt"), tmp_path / "sweep", tmp_path / "fig" / "scale.png"
    rc = main(["scale", "--source", str(src), "--out", str(out), "--depths", "1", "2", "--steps", "3", "6", "12",
               "--aspect", "8", "--head-dim", "4", "--batch-size", "4", "--block-size", "16", "--flops", "1e12",
               "--plot", str(plot)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "fit.json").read_text())
    runs = report["runs"]
    assert [(r["depth"], r["steps"]) for r in runs] == [(1, 3), (1, 6), (1, 12), (2, 3), (2, 6), (2, 12)]
    assert all(r["tokens"] == r["steps"] * 4 * 16 and np.isfinite(r["val_loss"]) for r in runs)
    assert runs[0]["params"] < runs[3]["params"]  # the depth dial makes depth 2 bigger
    fit = report["fit"]
    assert all(np.isfinite(fit[k]) and fit[k] > 0 for k in ("E", "A", "B", "alpha", "beta"))
    (front,) = report["frontier"]
    assert 6 * front["params"] * front["tokens"] == pytest.approx(1e12)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_lmzoo_scale_isoflop_budgets_spend_each_budget(tmp_path, capsys):
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    import json

    from lmzoo.cli.app import main

    out = tmp_path / "iso"
    rc = main(["scale", "--source", str(_corpus(tmp_path / "w.txt")), "--out", str(out), "--depths", "1", "2", "3",
               "--budgets", "2e7", "6e7", "--min-steps", "3", "--aspect", "8", "--head-dim", "4", "--batch-size", "4",
               "--block-size", "16", "--plot", str(tmp_path / "iso.png")])
    assert rc == 0, capsys.readouterr().err
    runs = json.loads((out / "fit.json").read_text())["runs"]
    assert len(runs) >= 5 and {r["depth"] for r in runs} == {1, 2, 3}
    for r in runs:  # each run spends its budget up to the rounding of its step count
        budget = min((2e7, 6e7), key=lambda c: abs(np.log(r["flops"] / c)))
        assert r["flops"] == pytest.approx(budget, rel=0.5 / r["steps"] + 1e-9)
    assert (tmp_path / "iso.png").stat().st_size > 0

@pytest.mark.parametrize("argv, msg", [
    (["--depths"], "expected at least one argument"),
    (["--depths", "1", "2", "--steps", "3", "6"], "needs >= 5 runs"),  # 4 runs: refused before training
    (["--depths", "0", "1", "--steps", "3", "6", "9"], "must be positive"),
])
def test_lmzoo_scale_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, msg):
    from lmzoo.cli.app import main

    out = tmp_path / "sweep"
    assert main(["scale", "--source", str(_corpus(tmp_path / "w.txt")), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.startswith("lmzoo: error:") and "\n" not in err
    assert not out.exists()  # nothing trained
