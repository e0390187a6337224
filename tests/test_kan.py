"""KAN (layers/kan.py): B-spline bases, gradients, grid update, and the KAN feed-forward in a GPT."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.layers.kan import (
    KANFeedForward,
    KANLinear,
    b_spline_bases,
    kan_hidden,
    uniform_grid,
    update_model_grids,
)


@pytest.mark.parametrize("grid_size,order", [(5, 3), (1, 0), (8, 2), (3, 4)])
def test_b_spline_bases_form_a_partition_of_unity_on_the_grid(grid_size, order):
    grid = uniform_grid(3, grid_size, order, (-1.0, 1.0))
    x = torch.rand(2000, 3, dtype=torch.float64) * 2 - 1  # inside [-1, 1)
    bases = b_spline_bases(x, grid.double(), order)
    assert bases.shape == (2000, 3, grid_size + order)
    torch.testing.assert_close(bases.sum(-1), torch.ones(2000, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (bases >= -1e-15).all()
    assert ((bases > 0).sum(-1) <= order + 1).all()  # local support: at most k + 1 bases are non-zero


def test_partition_of_unity_also_holds_on_a_grid_moved_by_update_grid():
    torch.manual_seed(0)
    layer = KANLinear(4, 3).double()
    x = torch.randn(500, 4, dtype=torch.float64) * torch.tensor([0.5, 1.0, 3.0, 0.2], dtype=torch.float64)
    layer.update_grid(x)
    k, G = layer.spline_order, layer.grid_size
    lo, hi = layer.grid[:, k], layer.grid[:, G + k]  # the grid proper, without the k extension knots
    assert (lo <= x.min(0).values).all() and (hi >= x.max(0).values).all()  # the grid covers the data
    inside = lo + (hi - lo) * torch.rand(1000, 4, dtype=torch.float64) * 0.999
    torch.testing.assert_close(layer.bases(inside).sum(-1), torch.ones(1000, 4, dtype=torch.float64))


def test_gradcheck_of_a_tiny_kan_layer_in_float64():
    torch.manual_seed(0)
    layer = KANLinear(3, 2, grid_size=4, spline_order=3, grid_range=(-1.0, 1.0)).double()
    with torch.no_grad():
        layer.spline_weight.normal_()  # non-trivial splines
    x = (torch.rand(5, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    params = [layer.base_weight, layer.spline_weight, layer.spline_scaler]
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *params))


def test_update_grid_keeps_the_function_on_the_data_it_saw():
    torch.manual_seed(0)
    layer = KANLinear(4, 3)
    with torch.no_grad():
        layer.spline_weight.normal_(0, 0.3)
    x = torch.rand(2000, 4) * 3.6 - 1.8  # inside the initial grid range (-2, 2)
    before = layer(x)
    old_grid = layer.grid.clone()
    layer.update_grid(x)
    assert not torch.equal(layer.grid, old_grid)
    err = (layer(x) - before).abs().mean() / before.abs().mean()
    assert err < 0.05  # refit by least squares on the new knots


def test_kan_feed_forward_in_a_gpt_has_about_the_parameters_of_the_mlp():
    mlp, kan = lmzoo.build("gpt2-char-cpu"), lmzoo.build("gpt2-char-cpu", mlp="kan")
    assert isinstance(kan.blocks[0].ffn, KANFeedForward)
    assert kan.config.hidden == kan_hidden(128) == 51
    assert abs(kan.num_params() / mlp.num_params() - 1) < 0.02
    assert lmzoo.build("gpt2-debug", mlp="kan", mlp_hidden=7).blocks[0].ffn.fc.out_features == 7


def test_kan_gpt_is_causal_and_cached_decoding_matches(tmp_path):
    torch.manual_seed(0)
    m = lmzoo.build("gpt2-debug", mlp="kan").eval()
    x = torch.randint(0, 97, (2, 20))
    full = m(x).logits
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(m(y).logits[:, :12], full[:, :12], atol=1e-5, rtol=0)
    cache = m.init_cache(2, 20)
    steps = [m(x[:, :7], cache=cache).logits] + [m(x[:, t : t + 1], cache=cache).logits for t in range(7, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    lmzoo.save(m, tmp_path / "kan")
    assert torch.equal(lmzoo.load(tmp_path / "kan")(x).logits, full)


def test_tiny_kan_model_trains_and_update_grid_runs_inside_it(shakespeare_data, tmp_path):
    from lmzoo.train import TrainConfig, Trainer

    cfg = TrainConfig.from_dict(dict(
        model="gpt2-debug", model_args={"mlp": "kan"}, data_dir=str(shakespeare_data),
        out_dir=str(tmp_path / "run"), batch_size=8, block_size=32, max_steps=40, eval_interval=40,
        eval_iters=2, warmup_steps=5, lr=3e-3, min_lr=3e-4, device="cpu", dtype="float32", progress=False,
        sample_tokens=0, threads=1,
    ))
    trainer = Trainer(cfg)
    summary = trainer.train()
    assert summary["val_loss"] < 3.6  # from ln(65) = 4.17
    # grid update from data on a trained model: the model still computes nearly the same loss
    x, y = trainer.val_loader.next_batch()
    model = trainer.model.eval()
    with torch.no_grad():
        before = model(x, y).loss.item()
        grid = model.blocks[0].ffn.fc.grid.clone()
        assert update_model_grids(model, x) == model.config.n_layer
        assert not torch.equal(model.blocks[0].ffn.fc.grid, grid)
        assert model(x, y).loss.item() < before + 0.3
