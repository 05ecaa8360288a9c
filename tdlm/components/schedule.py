"""The schedule interface: alpha_t, the probability that a token is still clean at time t."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tdlm.components.common import ComponentConfig, placeholder


class Schedule:
    """alpha_t: the probability that a token is still clean at time t in [0, 1].

    Implement `alpha` and `alpha_prime` (elementwise on float tensors); `mask_rate` and
    `weight` follow. alpha_0 = 1, alpha_1 = 0 (or a tiny eps), monotone decreasing.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    @placeholder
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @placeholder
    def alpha_prime(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def mask_rate(self, t: Tensor) -> Tensor:
        """1 - alpha_t, the probability that a token is masked at t. Default: `1 - alpha(t)`, which
        is 0 wherever alpha_t rounds to 1 (t < 1e-16 for linear in float64); override it with a
        form without that cancellation (t for linear, sin^2(pi t / 2) for cosine)."""
        return 1.0 - self.alpha(t)

    def weight(self, t: Tensor) -> Tensor:
        """NELBO weight w(t) = -alpha'_t / (1 - alpha_t) (docs/maths.md section 1)."""
        return -self.alpha_prime(t) / self.mask_rate(t)
