"""Noise schedules alpha_t (docs/maths.md section 1): the probability a token is still clean at t.

Every schedule gives alpha_t, its derivative, the mask rate 1 - alpha_t and the NELBO weight
w(t) = -alpha'_t / (1 - alpha_t) in closed form: `1 - alpha(t)` cancels to 0 near t = 0 (below
t = 1e-16 for linear, 1e-8 for cosine, in float64), and the plain ratio loses precision there. For a denoiser that does
not see t the NELBO is the same for every schedule (substitute u = 1 - alpha_t); the schedule only
changes the variance of its estimate and, in training, which mask rates are seen how often.

`loglinear` and `geometric` do not reach alpha_0 = 1 and alpha_1 = 0 exactly (see their
docstrings); the NELBO integral then leaves out mask rates below 1 - alpha_0 and above
1 - alpha_1, so keep those gaps tiny (the defaults leave out about 1e-3 and 1e-4 of the bound).
"""

import math

import torch
from pydantic import Field, model_validator

from tdlm.plugin import ComponentConfig, Schedule, hookimpl


class LinearSchedule(Schedule):
    """alpha_t = 1 - t, so w(t) = 1 / t."""

    class Config(ComponentConfig):
        """No options."""

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def mask_rate(self, t):
        return t.clone()

    def weight(self, t):
        return 1.0 / t


class CosineSchedule(Schedule):
    """alpha_t = cos^2(pi t / 2), so w(t) = pi * cot(pi t / 2)."""

    class Config(ComponentConfig):
        """No options."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t) ** 2

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(math.pi * t)

    def mask_rate(self, t):
        # 1 - cos^2 = sin^2: no cancellation near t = 0
        return torch.sin(0.5 * math.pi * t) ** 2

    def weight(self, t):
        # closed form: the ratio -alpha'/(1-alpha) loses precision near t = 0 in float32
        return math.pi / torch.tan(0.5 * math.pi * t)


class PolynomialSchedule(Schedule):
    """alpha_t = 1 - t^p, so alpha'_t = -p t^(p-1) and w(t) = p / t.

    p > 1 keeps tokens clean longer (fewer masks at small t), p < 1 masks them sooner; p = 1 is
    `linear`. It is also MD4's per-token schedule with every w_v = p (see `state-dependent`).
    """

    class Config(ComponentConfig):
        exponent: float = Field(2.0, gt=0.0)
        """p in alpha_t = 1 - t^p."""

    def alpha(self, t):
        return 1.0 - t**self.config.exponent

    def alpha_prime(self, t):
        p = self.config.exponent
        return -p * t ** (p - 1.0)

    def mask_rate(self, t):
        return t**self.config.exponent

    def weight(self, t):
        return self.config.exponent / t


class LogLinearSchedule(Schedule):
    """SEDD's / MDLM's log-linear noise: sigma(t) = -log(1 - (1 - eps) t), alpha_t = exp(-sigma).

    So alpha_t = 1 - (1 - eps) t, alpha'_t = -(1 - eps) and w(t) = 1 / t exactly. alpha_0 = 1 but
    alpha_1 = eps, not 0: even at t = 1 a fraction eps of the tokens is clean (the noise sigma(1)
    = -log eps stays finite, which is why SEDD uses it). The NELBO integral then covers mask rates
    up to 1 - eps only; the last step to all-masked, about eps * sum_i -log mu(x0_i | all masked)
    nats, is left out, a relative gap of about eps.
    """

    class Config(ComponentConfig):
        eps: float = Field(1e-3, ge=0.0, lt=1.0)
        """alpha_1 = eps: the fraction of tokens still clean at t = 1."""

    def alpha(self, t):
        return 1.0 - (1.0 - self.config.eps) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.config.eps))

    def mask_rate(self, t):
        return (1.0 - self.config.eps) * t

    def weight(self, t):
        # -alpha' / (1 - alpha) = (1 - eps) / ((1 - eps) t)
        return 1.0 / t


class GeometricSchedule(Schedule):
    """SEDD's geometric noise: sigma(t) = sigma_min^(1-t) * sigma_max^t, alpha_t = exp(-sigma(t)).

    sigma'(t) = sigma(t) * log(sigma_max / sigma_min), alpha'_t = -sigma'(t) alpha_t and
    w(t) = sigma'(t) / (exp(sigma(t)) - 1) (computed with expm1, so it stays accurate near t = 0,
    where it tends to sigma_min log(sigma_max / sigma_min) / expm1(sigma_min), a finite weight).
    The endpoints are only approximately clean / masked: alpha_0 = exp(-sigma_min) ~ 1 - sigma_min
    and alpha_1 = exp(-sigma_max) ~ 0 (2e-9 with the defaults). The mask rates below sigma_min and
    above 1 - exp(-sigma_max) are left out of the NELBO integral: a relative gap of about sigma_min.
    The mask rate grows geometrically in t, so small mask rates get most of the time (and of the
    training steps).
    """

    class Config(ComponentConfig):
        sigma_min: float = Field(1e-4, gt=0.0)
        """sigma(0): alpha_0 = exp(-sigma_min), the fraction of tokens clean at t = 0."""
        sigma_max: float = Field(20.0, gt=0.0)
        """sigma(1): alpha_1 = exp(-sigma_max), the fraction of tokens clean at t = 1."""

        @model_validator(mode="after")
        def _ordered(self):
            if self.sigma_max <= self.sigma_min:
                raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
            return self

    def _log_ratio(self):
        return math.log(self.config.sigma_max / self.config.sigma_min)

    def sigma(self, t):
        return self.config.sigma_min * torch.exp(t * self._log_ratio())

    def alpha(self, t):
        return torch.exp(-self.sigma(t))

    def alpha_prime(self, t):
        sigma = self.sigma(t)
        return -sigma * self._log_ratio() * torch.exp(-sigma)

    def mask_rate(self, t):
        return -torch.expm1(-self.sigma(t))

    def weight(self, t):
        sigma = self.sigma(t)
        return sigma * self._log_ratio() / torch.expm1(sigma)


@hookimpl
def register_schedules(register):
    register("linear", LinearSchedule)
    register("cosine", CosineSchedule)
    register("polynomial", PolynomialSchedule)
    register("loglinear", LogLinearSchedule)
    register("geometric", GeometricSchedule)
