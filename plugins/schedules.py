"""Noise schedules alpha_t (MATH.md section 1): the probability a token is still clean at t."""

import math

import torch

from tdlm import hookimpl
from tdlm.components import Schedule


class LinearSchedule(Schedule):
    """alpha_t = 1 - t, so w(t) = 1 / t."""

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def weight(self, t):
        return 1.0 / t


class CosineSchedule(Schedule):
    """alpha_t = cos^2(pi t / 2), so w(t) = pi * cot(pi t / 2)."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t) ** 2

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(math.pi * t)

    def weight(self, t):
        # closed form: the ratio -alpha'/(1-alpha) loses precision near t = 0 in float32
        return math.pi / torch.tan(0.5 * math.pi * t)


@hookimpl
def register_schedules(register):
    register("linear", LinearSchedule)
    register("cosine", CosineSchedule)
