"""Noise schedules against docs/maths.md section 1: endpoints, monotonicity, derivative, weight, and the
schedule invariance of one model's NELBO. Every built-in schedule is checked (the list comes from
the registry, so a new schedule is tested as soon as it is registered: give it a closed form below).
"""

import itertools
import math

import pytest
import torch
from scipy import integrate

from tdlm.components import Schedule, VocabInfo
from tdlm.registry import build_registry, get_plugin_manager


SCHEDULES = build_registry(get_plugin_manager(entry_points=False)).names("schedule")


def _geometric_sigma(t, lo, hi):
    return lo ** (1.0 - t) * hi**t


# name -> options -> closed forms; every registered schedule must have an entry
CLOSED_FORM_ALPHA = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: torch.cos(0.5 * math.pi * t) ** 2,
    "polynomial": lambda t, exponent=2.0: 1.0 - t**exponent,
    "loglinear": lambda t, eps=1e-3: torch.exp(torch.log1p(-(1.0 - eps) * t)),  # exp(-sigma), SEDD's form
    "geometric": lambda t, sigma_min=1e-4, sigma_max=20.0: torch.exp(-_geometric_sigma(t, sigma_min, sigma_max)),
}
CLOSED_FORM_WEIGHT = {
    "linear": lambda t: 1.0 / t,
    "cosine": lambda t: math.pi / torch.tan(0.5 * math.pi * t),
    "polynomial": lambda t, exponent=2.0: exponent / t,
    "loglinear": lambda t, eps=1e-3: 1.0 / t,
    # sigma' e^-sigma / (1 - e^-sigma) with sigma' = sigma log(sigma_max / sigma_min)
    "geometric": lambda t, sigma_min=1e-4, sigma_max=20.0: (
        _geometric_sigma(t, sigma_min, sigma_max) * math.log(sigma_max / sigma_min)
        / torch.expm1(_geometric_sigma(t, sigma_min, sigma_max))
    ),
}
ENDPOINTS = {  # (alpha_0, alpha_1) with the default options
    "linear": (1.0, 0.0),
    "cosine": (1.0, 0.0),
    "polynomial": (1.0, 0.0),
    "loglinear": (1.0, 1e-3),
    "geometric": (math.exp(-1e-4), math.exp(-20.0)),
}
# every schedule with its defaults, plus options that move it far from them
CASES = [(name, {}) for name in SCHEDULES] + [
    ("polynomial", {"exponent": 0.5}),
    ("polynomial", {"exponent": 3.0}),
    ("loglinear", {"eps": 0.0}),
    ("loglinear", {"eps": 0.05}),
    ("geometric", {"sigma_min": 1e-3, "sigma_max": 10.0}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in CASES]


def make_schedule(registry, name, **options):
    cls = registry.get("schedule", name).cls
    return cls(cls.Config(**options))


def test_every_registered_schedule_has_closed_forms():
    assert {"linear", "cosine", "polynomial", "loglinear", "geometric"} <= set(SCHEDULES)
    missing = set(SCHEDULES) - (set(CLOSED_FORM_ALPHA) & set(CLOSED_FORM_WEIGHT) & set(ENDPOINTS))
    assert not missing, f"add the closed forms of {sorted(missing)} to this file"


@pytest.mark.parametrize("name", SCHEDULES)
def test_endpoints(registry, name):
    """alpha_0 = 1 and alpha_1 = 0, or within the small gap a schedule documents."""
    schedule = make_schedule(registry, name)
    ends = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    start, end = ENDPOINTS[name]
    assert ends[0].item() == pytest.approx(start, abs=1e-12) and ends[0].item() >= 1.0 - 1e-3
    assert ends[1].item() == pytest.approx(end, abs=1e-12) and 0.0 <= ends[1].item() <= 1e-3 + 1e-12


def test_options_move_the_endpoints(registry):
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert make_schedule(registry, "loglinear", eps=0.05).alpha(ends).tolist() == pytest.approx([1.0, 0.05])
    geometric = make_schedule(registry, "geometric", sigma_min=0.01, sigma_max=5.0).alpha(ends)
    assert geometric.tolist() == pytest.approx([math.exp(-0.01), math.exp(-5.0)])
    with pytest.raises(ValueError, match="sigma_max"):
        make_schedule(registry, "geometric", sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError):
        make_schedule(registry, "polynomial", exponent=0.0)


@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_alpha_matches_closed_form(registry, name, options):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha = make_schedule(registry, name, **options).alpha(t)
    torch.testing.assert_close(alpha, CLOSED_FORM_ALPHA[name](t, **options), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_monotone_decreasing(registry, name, options):
    schedule = make_schedule(registry, name, **options)
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert (alpha.diff() <= 0).all()
    assert (alpha[::100].diff() < 0).all()  # strictly, at a coarser grid
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert (schedule.alpha_prime(t[1:-1]) < 0).all()


@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_alpha_prime_matches_finite_differences(registry, name, options):
    schedule = make_schedule(registry, name, **options)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.alpha_prime(t), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(registry, name, options):
    schedule = make_schedule(registry, name, **options)
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    generic = Schedule.weight(schedule, t)  # the interface's definition, -alpha' / (1 - alpha)
    # 1 - alpha loses up to 1e-7 of its value in float64 where alpha is within 1e-9 of 1
    torch.testing.assert_close(schedule.weight(t), generic, rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.weight(t), CLOSED_FORM_WEIGHT[name](t, **options), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_weight_is_accurate_in_float32_near_zero(registry, name, options):
    """The estimator evaluates w(t) at tiny t; float32 must not lose it."""
    schedule = make_schedule(registry, name, **options)
    t64 = torch.logspace(-7, -1, 25, dtype=torch.float64)
    t32 = t64.float()
    reference = CLOSED_FORM_WEIGHT[name](t32.double(), **options)  # exact weight at the float32 times
    got = schedule.weight(t32)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all() and (got > 0).all()
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name, options", CASES, ids=CASE_IDS)
def test_weight_normalises_the_bound(registry, name, options):
    """integral_0^1 w(t) (1 - alpha_t) dt = alpha_0 - alpha_1 (= 1 for exact endpoints): why
    uniform predictions score ln|V| (times alpha_0 - alpha_1)."""
    schedule = make_schedule(registry, name, **options)

    def integrand(t):
        tt = torch.tensor([t], dtype=torch.float64)
        return (schedule.weight(tt) * (1.0 - schedule.alpha(tt))).item()

    value, err = integrate.quad(integrand, 0.0, 1.0, limit=200)
    ends = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert value == pytest.approx((ends[0] - ends[1]).item(), abs=1e-7)


# 1 - alpha_t in 150-digit arithmetic (mpmath, which torch installs with sympy), from alpha alone
def _mp_geometric_alpha(mp, t, sigma_min=1e-4, sigma_max=20.0):
    return mp.exp(-mp.mpf(sigma_min) ** (1 - t) * mp.mpf(sigma_max) ** t)


EXACT_MASK_RATE = {
    "linear": lambda mp, t: 1 - (1 - t),
    "cosine": lambda mp, t: 1 - mp.cos(mp.pi * t / 2) ** 2,
    "polynomial": lambda mp, t, exponent=2.0: 1 - (1 - t ** mp.mpf(exponent)),
    "loglinear": lambda mp, t, eps=1e-3: 1 - mp.exp(mp.log(1 - (1 - mp.mpf(eps)) * t)),
    "geometric": lambda mp, t, **options: 1 - _mp_geometric_alpha(mp, t, **options),
}


# geometric's mask rate is at least about sigma_min: a tiny one is where 1 - exp(-sigma) cancels
MASK_RATE_CASES = CASES + [("geometric", {"sigma_min": 1e-10, "sigma_max": 20.0})]


@pytest.mark.parametrize("t", [1e-20, 1e-12, 1e-6, 0.3, 0.999])
@pytest.mark.parametrize("name, options", MASK_RATE_CASES,
                         ids=CASE_IDS + ["geometric-sigma_min=1e-10"])
def test_mask_rate_is_one_minus_alpha_without_cancellation(registry, name, options, t):
    """mask_rate(t) = 1 - alpha_t to 1e-12 relative, also where 1 - alpha(t) in float64 is 0 or
    holds a few digits (t = 1e-20 linear, 1e-12 cosine): the corruptions mask with it."""
    mpmath = pytest.importorskip("mpmath")
    schedule = make_schedule(registry, name, **options)
    got = schedule.mask_rate(torch.tensor([t], dtype=torch.float64))
    assert got.dtype == torch.float64
    with mpmath.workdps(150):  # t^3 = 1e-60 must survive 1 - (1 - t^3)
        exact = EXACT_MASK_RATE[name](mpmath, mpmath.mpf(t), **options)  # mpf(t): the float64 t itself
        assert float(abs(got.item() - exact) / exact) < 1e-12, (got.item(), exact)


def test_every_registered_schedule_has_an_exact_mask_rate():
    missing = set(SCHEDULES) - set(EXACT_MASK_RATE)
    assert not missing, f"add the exact 1 - alpha of {sorted(missing)} to EXACT_MASK_RATE"


def test_the_default_mask_rate_is_one_minus_alpha_and_loses_small_t(registry):
    """A third-party schedule that gives only alpha gets 1 - alpha(t): right at ordinary t, 0 at
    t = 1e-20 (why the built-ins override it)."""
    linear = make_schedule(registry, "linear")
    t = torch.tensor([1e-20, 0.25, 0.5], dtype=torch.float64)
    assert Schedule.mask_rate(linear, t).tolist() == [0.0, 0.25, 0.5]
    assert linear.mask_rate(t).tolist() == t.tolist()

    class OwnMaskRate(Schedule):  # alpha, alpha' and an exact mask rate: the default weight uses it
        alpha, alpha_prime, mask_rate = linear.alpha, linear.alpha_prime, linear.mask_rate

    assert Schedule.weight(OwnMaskRate(None), t).tolist() == (1.0 / t).tolist()  # -alpha' / mask_rate, 1e20 at 1e-20


# --- one model's NELBO is the same under every schedule --------------------------------------


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dirichlet_distribution(vocab_size, length, seed):
    """Every one of the V^N sequences, with Dirichlet(1) probabilities."""
    support = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
    torch.manual_seed(seed)
    probs = torch.distributions.Dirichlet(torch.ones(len(support), dtype=torch.float64)).sample()
    return support, probs


def weighted_nelbo(registry, schedule, net, vocab, seqs, weights, *, repeats, t_samples, seed):
    """sum_x weights[x] * NELBO(x) under `schedule` (uniform masking, diffusion objective), and its stderr."""
    corruption_cls = registry.get("corruption", "uniform").cls
    objective_cls = registry.get("objective", "diffusion").cls
    corruption = corruption_cls(corruption_cls.Config(), schedule=schedule, vocab=vocab)
    objective = objective_cls(objective_cls.Config(eval_schedule="recipe"), corruption=corruption, vocab=vocab)
    scores = objective.score(net, seqs.repeat_interleave(repeats, 0), generator=gen(seed), t_samples=t_samples)
    nll = scores.nll.view(len(seqs), repeats).mean(1)
    var = scores.nll_var.view(len(seqs), repeats).sum(1) / repeats**2
    return (weights * nll).sum().item(), (weights**2 * var).sum().sqrt().item()


class ScaledWeight(Schedule):
    """A schedule whose masking is right but whose NELBO weight is off by a factor."""

    def __init__(self, inner, factor):
        self.inner, self.factor = inner, factor

    def alpha(self, t):
        return self.inner.alpha(t)

    def alpha_prime(self, t):
        return self.inner.alpha_prime(t)

    def weight(self, t):
        return self.factor * self.inner.weight(t)


@pytest.fixture(scope="module")
def mismatched_model(exact_denoiser):
    """Data from one Dirichlet distribution on 3^4 sequences, scored by the exact denoiser of
    another: the conditionals depend strongly on the mask pattern and the bound is not tight."""
    vocab_size, length = 3, 4
    support, probs = dirichlet_distribution(vocab_size, length, seed=0)
    _, model_probs = dirichlet_distribution(vocab_size, length, seed=1)
    vocab = VocabInfo(size=vocab_size, mask_id=vocab_size, bos_id=0)
    net = exact_denoiser(support, 0.5 * model_probs + 0.5 * probs, vocab_size, vocab.mask_id)
    return dict(net=net, vocab=vocab, support=support, probs=probs)


def test_nelbo_is_schedule_invariant(registry, mismatched_model):
    """Every schedule's estimate of one model's NELBO agrees with linear's within 4 combined
    standard errors, and that tolerance is tight enough to catch a weight off by 5%."""
    m = mismatched_model
    kw = dict(repeats=32, t_samples=32)
    args = (m["net"], m["vocab"], m["support"], m["probs"])
    reference, se_ref = weighted_nelbo(registry, make_schedule(registry, "linear"), *args, seed=100, **kw)
    entropy = -(m["probs"] * m["probs"].log()).sum().item()
    assert reference > entropy + 5 * se_ref  # the model is not exact: the bound is not tight
    all_masked = torch.full((1, m["support"].shape[1]), m["vocab"].mask_id)
    full_mask_ce = -(m["net"](all_masked)[0].gather(-1, m["support"].T).T.sum(-1) * m["probs"]).sum().item()
    for seed, (name, options) in enumerate(CASES, start=101):
        schedule = make_schedule(registry, name, **options)
        value, se = weighted_nelbo(registry, schedule, *args, seed=seed, **kw)
        tolerance = 4 * math.hypot(se, se_ref)
        assert tolerance < 0.06 * reference
        alpha_1 = schedule.alpha(torch.tensor(1.0, dtype=torch.float64)).item()
        if alpha_1 > 1e-2:  # loglinear's documented gap: mask rates 1 - eps .. 1 are left out,
            # about integral_{1-eps}^1 du / u * (the CE at (nearly) all masked)
            value += -math.log1p(-alpha_1) * full_mask_ce
        assert abs(value - reference) < tolerance, (name, options, value, reference, tolerance)
    broken = ScaledWeight(make_schedule(registry, "linear"), 1.05)
    value, se = weighted_nelbo(registry, broken, *args, seed=99, **kw)
    assert abs(value - reference) > 4 * math.hypot(se, se_ref)
