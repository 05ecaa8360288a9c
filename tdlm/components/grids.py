"""Time grids shared by the samplers (docs/maths.md section 5), and the masked counts they imply:
use them so that `grid = "cosine"` means the same in every sampler."""

from __future__ import annotations

import math

import torch


def time_grid(steps: int, kind: str, device=None) -> torch.Tensor:
    """steps + 1 times from 1 down to 0: uniform, or cosine t(i) = cos^2(pi/2 * i / T)."""
    i = torch.arange(steps + 1, dtype=torch.float64, device=device) / steps
    if kind == "uniform":
        return 1.0 - i
    if kind == "cosine":
        return torch.cos(0.5 * math.pi * i) ** 2
    raise ValueError(f"unknown time grid {kind!r}; use 'uniform' or 'cosine'")


def commit_count(masked_now: torch.Tensor, masked_at_start: torch.Tensor, t_next: float | torch.Tensor) -> torch.Tensor:
    """Tokens to commit in a step that ends at grid time `t_next`, per row ([B] long in, [B] out).

    After the step round(masked_at_start * t_next) positions stay masked (round half to even),
    but every row that still has a masked position commits at least one, so a row that got ahead
    of the grid keeps committing one per step; at t_next = 0 everything left is committed.
    """
    target = torch.round(masked_at_start.double() * t_next).long()
    remain = torch.minimum(target, masked_now - 1).clamp_min(0)
    return masked_now - remain
