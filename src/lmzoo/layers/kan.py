"""Kolmogorov-Arnold Network layers (Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks").

An MLP puts fixed activations on nodes and learned weights on edges. A KAN layer puts a learned
univariate function on every edge and only sums on the nodes:

    y_o = sum_i phi_{o,i}(x_i),   phi_{o,i}(x) = w_b[o,i] * silu(x) + w_s[o,i] * sum_j c[o,i,j] B_j(x)

``B_j`` are the G + k B-spline bases of order k on a grid of G intervals over ``grid_range``
(extended by k knots on each side so that every point of the range is covered by k + 1 bases);
``silu`` is the residual "base" branch that keeps the layer trainable where the splines are flat.
Each edge holds G + k + 2 parameters (k = 3, G = 5: 10), so at equal parameters a KAN is far
narrower than an MLP (:func:`kan_hidden`).

The grid follows the data: :meth:`KANLinear.update_grid` places the knots at quantiles of a batch
of inputs (blended with a uniform grid by ``grid_eps``) and refits the coefficients by least
squares so that the layer computes (nearly) the same function on that batch.

The bases come from the Cox-de Boor recursion; the implementation follows efficient-kan
(Blealtan 2024): all edges' splines evaluated as one (N, in * (G + k)) x (in * (G + k), out) matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def b_spline_bases(x: torch.Tensor, grid: torch.Tensor, order: int) -> torch.Tensor:
    """B-spline bases by the Cox-de Boor recursion.

    x (N, in); grid (in, G + 2k + 1) knots per input, increasing -> bases (N, in, G + k).
    Order 0 is the indicator of [t_j, t_{j+1}); each order mixes two neighbours of the previous one:
    B_{j,p}(x) = (x - t_j) / (t_{j+p} - t_j) B_{j,p-1}(x) + (t_{j+p+1} - x) / (t_{j+p+1} - t_{j+1}) B_{j+1,p-1}(x).
    """
    x = x.unsqueeze(-1)  # (N, in, 1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)  # (N, in, G + 2k)
    for p in range(1, order + 1):
        left = (x - grid[:, : -(p + 1)]) / (grid[:, p:-1] - grid[:, : -(p + 1)])
        right = (grid[:, p + 1 :] - x) / (grid[:, p + 1 :] - grid[:, 1:-p])
        bases = left * bases[..., :-1] + right * bases[..., 1:]
    return bases


def uniform_grid(in_features: int, grid_size: int, order: int, grid_range: tuple[float, float]) -> torch.Tensor:
    """(in, G + 2k + 1) equally spaced knots over ``grid_range``, extended by k knots on each side."""
    lo, hi = grid_range
    h = (hi - lo) / grid_size
    knots = torch.arange(-order, grid_size + order + 1, dtype=torch.float32) * h + lo
    return knots.expand(in_features, -1).contiguous()


class KANLinear(nn.Module):
    """One KAN layer: x (..., in_features) -> (..., out_features).

    Parameters: ``base_weight`` (out, in) of the silu branch, ``spline_weight`` (out, in, G + k)
    the spline coefficients c, ``spline_scaler`` (out, in) the per-edge scale w_s. Buffer ``grid``
    (in, G + 2k + 1) of knots.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-2.0, 2.0),
        grid_eps: float = 0.02,
        init_noise: float = 0.1,
    ):
        super().__init__()
        if grid_size < 1 or spline_order < 0:
            raise ValueError(f"grid_size must be >= 1 and spline_order >= 0, got {grid_size}, {spline_order}")
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order, self.grid_eps = grid_size, spline_order, grid_eps
        self.register_buffer("grid", uniform_grid(in_features, grid_size, spline_order, grid_range))
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters(init_noise)

    @torch.no_grad()
    def reset_parameters(self, init_noise: float = 0.1) -> None:
        """pykan's init: base weights like nn.Linear, spline scales 1, small random coefficients
        (each edge starts close to the silu branch alone)."""
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.base_weight, -bound, bound)
        nn.init.ones_(self.spline_scaler)
        nn.init.normal_(self.spline_weight, 0.0, init_noise * bound)

    def bases(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, in, G + k) B-spline bases on this layer's grid."""
        return b_spline_bases(x, self.grid.to(x.dtype), self.spline_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # (N, in)
        base = F.linear(F.silu(x), self.base_weight)
        coeff = self.spline_weight * self.spline_scaler.unsqueeze(-1)  # (out, in, G + k)
        spline = F.linear(self.bases(x).reshape(x.shape[0], -1), coeff.reshape(self.out_features, -1))
        return (base + spline).reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> None:
        """Move the knots to the distribution of ``x`` (..., in) and refit the coefficients.

        New knots: ``grid_eps`` * uniform grid over [min - margin, max + margin] + (1 - grid_eps) *
        the G + 1 quantiles of x, per input; then c is solved by least squares so that each
        edge's spline part w_s * sum_j c_j B_j(x) keeps its values on x.
        """
        x = x.reshape(-1, self.in_features).float()
        N, k, G = x.shape[0], self.spline_order, self.grid_size
        old = torch.einsum("nij,oij->ino", self.bases(x), self.spline_weight.float())  # (in, N, out)
        xs = x.sort(dim=0).values
        adaptive = xs[torch.linspace(0, N - 1, G + 1, dtype=torch.long, device=x.device)]  # (G+1, in)
        step = (xs[-1] - xs[0] + 2 * margin) / G  # (in,)
        uniform = torch.arange(G + 1, device=x.device, dtype=x.dtype)[:, None] * step + xs[0] - margin
        grid = self.grid_eps * uniform + (1 - self.grid_eps) * adaptive  # (G+1, in)
        ext = torch.arange(1, k + 1, device=x.device, dtype=x.dtype)[:, None] * step
        grid = torch.cat([grid[:1] - ext.flip(0), grid, grid[-1:] + ext])  # (G + 2k + 1, in)
        self.grid.copy_(grid.T)
        self.spline_weight.copy_(self._fit(x, old))

    def _fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients: x (N, in), y (in, N, out) -> (out, in, G + k)."""
        A = self.bases(x).transpose(0, 1)  # (in, N, G + k)
        coeff = torch.linalg.lstsq(A, y, driver="gelsd" if A.device.type == "cpu" else None).solution
        return coeff.permute(2, 0, 1).to(self.spline_weight.dtype)  # (out, in, G + k)


def kan_params_per_edge(grid_size: int = 5, spline_order: int = 3) -> int:
    """Parameters of one KAN edge: G + k spline coefficients, the spline scale and the base weight."""
    return grid_size + spline_order + 2


def kan_hidden(dim: int, mlp_hidden: int | None = None, grid_size: int = 5, spline_order: int = 3) -> int:
    """Hidden width at which a two-layer KAN ``dim -> h -> dim`` has about the weights of a two-layer
    MLP ``dim -> mlp_hidden -> dim`` (default 4 * dim): h = mlp_hidden / (G + k + 2)."""
    mlp_hidden = mlp_hidden or 4 * dim
    return max(1, round(mlp_hidden / kan_params_per_edge(grid_size, spline_order)))


class KANFeedForward(nn.Module):
    """A KAN in place of the Transformer MLP: ``proj(fc(x))``, two KAN layers dim -> hidden -> dim.

    No activation in between: every edge is already a learned nonlinear function.
    x (..., dim) -> (..., dim).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-2.0, 2.0),
        dropout: float = 0.0,
    ):
        super().__init__()
        self.fc = KANLinear(dim, hidden, grid_size, spline_order, grid_range)
        self.proj = KANLinear(hidden, dim, grid_size, spline_order, grid_range)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.fc(x)))

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor) -> None:
        """Adapt both layers' grids to the inputs they see for ``x`` (..., dim)."""
        self.fc.update_grid(x)
        self.proj.update_grid(self.fc(x))


@torch.no_grad()
def update_model_grids(model: nn.Module, *inputs, **kwargs) -> int:
    """Adapt every :class:`KANFeedForward` of ``model`` to the inputs it sees on ``model(*inputs, **kwargs)``.

    Layer by layer, first to last, with a fresh forward pass each (a moved grid changes what the
    later layers see). Returns the number of feed-forwards updated.
    """
    kans = [m for m in model.modules() if isinstance(m, KANFeedForward)]
    for kan in kans:
        seen = []
        handle = kan.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0]))
        try:
            model(*inputs, **kwargs)
        finally:
            handle.remove()
        kan.update_grid(torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]))
    return len(kans)
