"""Paths and grids in latent space: interpolation between codes and the 2-D manifold grid (paper Fig. 4)."""

from __future__ import annotations

import torch


def lerp(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` codes on the straight line from z0 to z1, ends included -> (steps, D)."""
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device).unsqueeze(1)
    return (1 - t) * z0 + t * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985): keeps codes at the norm typical of N(0, I) samples, which the
    straight line's midpoint is not. Falls back to lerp when the two codes are (anti)parallel."""
    n0, n1 = z0.norm(), z1.norm()
    cos = torch.clamp((z0 @ z1) / (n0 * n1).clamp_min(1e-12), -1.0, 1.0)
    omega = torch.arccos(cos)
    if n0 < 1e-12 or n1 < 1e-12 or torch.sin(omega).abs() < 1e-6:
        return lerp(z0, z1, steps)
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device).unsqueeze(1)
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def manifold_grid(steps: int, center: torch.Tensor, directions: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """A steps x steps grid of codes, row-major, spanning center +- span[i] * directions[i] -> (steps**2, D).

    Rows run from +span to -span along the second direction (like a plot's y axis), columns from -span to +span
    along the first. For a 2-D model, identity directions and span 1.645 cover the prior's central 90%."""
    ticks = torch.linspace(-1, 1, steps, dtype=center.dtype)
    rows, cols = torch.meshgrid(-ticks, ticks, indexing="ij")
    return center + (cols.reshape(-1, 1) * span[0]) * directions[0] + (rows.reshape(-1, 1) * span[1]) * directions[1]
