"""Noise schedules against MATH.md section 1: endpoints, monotonicity, derivative, weight."""

import math

import pytest
import torch
from scipy import integrate

from tdlm.components import Schedule

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = ["linear", "cosine"]
CLOSED_FORM_WEIGHT = {
    "linear": lambda t: 1.0 / t,
    "cosine": lambda t: math.pi / torch.tan(0.5 * math.pi * t),
}
CLOSED_FORM_ALPHA = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: torch.cos(0.5 * math.pi * t) ** 2,
}


def make_schedule(registry, name):
    cls = registry.get("schedule", name).cls
    return cls(cls.Config())


@pytest.mark.parametrize("name", SCHEDULES)
def test_endpoints(registry, name):
    schedule = make_schedule(registry, name)
    ends = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends[0].item() == pytest.approx(1.0, abs=1e-12)
    assert 0.0 <= ends[1].item() < 1e-9


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_matches_closed_form(registry, name):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha = make_schedule(registry, name).alpha(t)
    torch.testing.assert_close(alpha, CLOSED_FORM_ALPHA[name](t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_monotone_decreasing(registry, name):
    schedule = make_schedule(registry, name)
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert (alpha.diff() <= 0).all()
    assert (alpha[::100].diff() < 0).all()  # strictly, at a coarser grid
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert (schedule.alpha_prime(t[1:-1]) < 0).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_prime_matches_finite_differences(registry, name):
    schedule = make_schedule(registry, name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.alpha_prime(t), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(registry, name):
    schedule = make_schedule(registry, name)
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    generic = Schedule.weight(schedule, t)  # the interface's definition, -alpha' / (1 - alpha)
    torch.testing.assert_close(schedule.weight(t), generic, rtol=1e-8, atol=0)
    torch.testing.assert_close(schedule.weight(t), CLOSED_FORM_WEIGHT[name](t), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_is_accurate_in_float32_near_zero(registry, name):
    """The estimator evaluates w(t) at tiny t; float32 must not lose it."""
    schedule = make_schedule(registry, name)
    t64 = torch.logspace(-7, -1, 25, dtype=torch.float64)
    t32 = t64.float()
    reference = CLOSED_FORM_WEIGHT[name](t32.double())  # exact weight at the float32 times
    got = schedule.weight(t32)
    assert torch.isfinite(got).all() and (got > 0).all()
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_normalises_the_bound(registry, name):
    """integral_0^1 w(t) (1 - alpha_t) dt = 1: why uniform predictions score exactly ln|V|."""
    schedule = make_schedule(registry, name)

    def integrand(t):
        tt = torch.tensor([t], dtype=torch.float64)
        return (schedule.weight(tt) * (1.0 - schedule.alpha(tt))).item()

    value, err = integrate.quad(integrand, 0.0, 1.0, limit=200)
    assert value == pytest.approx(1.0, abs=1e-7)
