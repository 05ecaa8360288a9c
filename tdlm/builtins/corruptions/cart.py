"""CART: context-adaptive token-level loss weights (Dream, 2025; docs/maths.md section 4).

The forward process is `uniform`'s (each position masked with probability 1 - alpha_t). Only the
training weighting changes: the masked cross-entropy at position n is multiplied by

    c_n = 0.5 * sum over unmasked positions i != n of p (1 - p)^(|n - i| - 1)

in place of the NELBO weight w(t) (Dream replaces w(t) by this w(t, x_t, n)). A masked token with
clean neighbours counts more; one deep inside a masked span counts little. c_n is at most 1 (every
other position clean, in an infinite sequence), while w(t) = 1/t is at least 1, so the training loss
is on a smaller scale than the NELBO and does not bound anything. `nelbo_terms` is `uniform`'s, so
`tdlm eval` (objective.score) reports the same NELBO as for a `uniform` run and stays comparable.
"""

import torch
from pydantic import Field

from tdlm.builtins.corruptions.uniform import UniformMasking
from tdlm.plugin import ComponentConfig, hookimpl


def cart_kernel(length: int, p: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """K [N, N] with K[n, i] = p (1 - p)^(|n - i| - 1) for i != n and 0 on the diagonal (symmetric)."""
    index = torch.arange(length, device=device)
    distance = (index[:, None] - index[None, :]).abs()
    kernel = p * (1.0 - p) ** (distance - 1).clamp_min(0).to(torch.float64)
    return kernel.masked_fill(distance == 0, 0.0).to(dtype)


def cart_weights(masked: torch.Tensor, p: float) -> torch.Tensor:
    """c [B, N] from the mask indicator [B, N] (bool): 0.5 * (clean indicator) @ K, one matmul."""
    clean = (~masked).float()
    return 0.5 * clean @ cart_kernel(masked.shape[-1], p, device=masked.device)


class CARTMasking(UniformMasking):
    """Uniform masking whose training loss weights each masked token by the clean context around
    it (Dream's CART: a geometric kernel over the distance to each clean token) in place of w(t);
    evaluation keeps the uniform NELBO, a valid bound."""

    class Config(ComponentConfig):
        p: float = Field(0.3, gt=0.0, le=1.0)
        """Success probability of the geometric kernel: how fast a clean token's influence decays
        with distance."""

    def training_terms(self, denoise, x0, t, generator):
        xt = self.corrupt(x0, t, generator)
        weights = cart_weights(xt == self.vocab.mask_id, self.config.p)
        return denoise(xt).cross_entropy(x0, weights)


@hookimpl
def register_corruptions(register):
    register("cart", CARTMasking)
