"""The reverse kernel of the ancestral chain (docs/maths.md section 5.2), in one place.

`ancestral` samples this chain and `speculative` drafts and verifies it: its exactness rests on
both using the very same kernel, so both build it here (`reverse_kernel`) and draw from it here
(`ReverseKernel.draw`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tdlm.components.common import sample_categorical
from tdlm.components.corruption import Corruption


def denoiser_probs(logits: Tensor, temperature: float) -> Tensor:
    """mu(. | x_t) at `temperature`: the softmax of logits / temperature, in float64 (section 5.3)."""
    return torch.softmax(logits.double() / temperature, dim=-1)


@dataclass(frozen=True)
class ReverseKernel:
    """One reverse step t -> s at each position of R canvases of L positions.

    A masked position becomes token v with probability `unmask[..., v]` and stays masked with the
    rest of the mass; a position that may not move is copied.
    """

    unmask: Tensor  # [R, L, V] float64

    def rows(self, index: Tensor) -> "ReverseKernel":
        return ReverseKernel(self.unmask[index])

    def draw(self, x: Tensor, movable: Tensor, generator: torch.Generator | None) -> Tensor:
        """y ~ K(. | x): first whether each movable position unmasks (probability sum_v unmask_v),
        then its token, drawn only where one does; the same law as one draw over V tokens and
        "stay masked", with V times fewer uniforms."""
        leave = torch.rand(movable.shape, generator=generator, device=x.device, dtype=torch.float64)
        moves = movable & (leave < self.unmask.sum(-1))
        y = x.clone()
        if moves.any():
            y[moves] = sample_categorical(self.unmask[moves], generator)
        return y

    def table(self) -> Tensor:
        """[R, L, V + 1] float64, each row summing to 1: index v < V unmasks to v, index V (the
        mask id) stays masked. It is the law `draw` samples: a total unmask mass above 1 (from
        rounding) is scaled down to 1, as `draw`'s comparison with a uniform does."""
        moved, stay = self._moved_and_stay()
        return torch.cat([self.unmask, stay[..., None]], dim=-1) / (moved + stay)[..., None]

    def log_prob(self, y: Tensor, movable: Tensor) -> Tensor:
        """log K(y | x) [R]: the sum over the movable positions of log `table`[y_n] (y_n == the
        mask id V: "stay masked")."""
        size = self.unmask.shape[-1]
        moved, stay = self._moved_and_stay()
        token = self.unmask.gather(-1, y.clamp(max=size - 1).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(y == size, stay, token) / (moved + stay)
        return torch.where(movable, picked.log(), 0.0).sum(-1)

    def _moved_and_stay(self) -> tuple[Tensor, Tensor]:
        moved = self.unmask.sum(-1)
        return moved, (1.0 - moved).clamp_min(0.0)


def reverse_kernel(corruption: Corruption, probs: Tensor, x: Tensor, t: Tensor, s: Tensor) -> ReverseKernel:
    """The kernel from t to s [R] at the canvases x [R, L], the denoiser's mu being `probs`
    [R, L, V] (see `denoiser_probs`): the corruption's own reverse step."""
    return ReverseKernel(corruption.reverse_unmask_probs(probs, x, t, s))
