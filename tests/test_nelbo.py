"""The masked-diffusion NELBO and the AR NLL against docs/maths.md sections 1-2.

Monte Carlo comparisons use fixed seeds and a tolerance of a few standard errors of the
estimator, plus a check that the tolerance is tight enough to catch a wrong weighting.
"""

import itertools
import math

import pytest
import torch
from torch import nn

from nets import ZeroLogits
from tdlm.components import stratified_times
from tdlm.head import Denoised


SCHEDULES = ["linear", "cosine"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def toy_distribution(vocab_size, length, seed):
    """Every one of the V^N sequences, with Dirichlet(1) probabilities."""
    support = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
    probs = torch.distributions.Dirichlet(torch.ones(len(support), dtype=torch.float64))
    torch.manual_seed(seed)
    return support, probs.sample()


def make_objective(registry, vocab, schedule, *, objective="diffusion"):
    """A fresh corruption + objective around any Schedule instance (or registered name)."""
    if isinstance(schedule, str):
        cls = registry.get("schedule", schedule).cls
        schedule = cls(cls.Config())
    corruption_cls = registry.get("corruption", "uniform").cls
    corruption = corruption_cls(corruption_cls.Config(), schedule=schedule, vocab=vocab)
    objective_cls = registry.get("objective", objective).cls
    # the score must draw t under this very schedule (the default evaluation would use cosine's)
    options = {"eval_schedule": "recipe"} if objective == "diffusion" else {}
    return objective_cls(objective_cls.Config(**options), corruption=corruption, vocab=vocab)


def weighted_nelbo(objective, net, seqs, weights, *, repeats, t_samples, seed):
    """sum_x weights[x] * NELBO(x) and its standard error (each x scored `repeats` times)."""
    x0 = seqs.repeat_interleave(repeats, 0)
    scores = objective.score(net, x0, generator=gen(seed), t_samples=t_samples)
    nll = scores.nll.view(len(seqs), repeats).mean(1)
    var = scores.nll_var.view(len(seqs), repeats).sum(1) / repeats**2
    weights = weights.double()
    return (weights * nll).sum().item(), (weights**2 * var).sum().sqrt().item()


# --- uniform predictions: ln|V| per token for every correct estimator ------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_uniform_predictions_nelbo_is_log_vocab(build, schedule):
    vocab_size, length, batch = 50, 16, 256
    objective = build(vocab_size=vocab_size, seq_len=length, schedule=schedule).model.objective
    x0 = torch.randint(0, vocab_size, (batch, length), generator=gen(0))
    scores = objective.score(ZeroLogits(vocab_size), x0, generator=gen(1), t_samples=64)
    assert scores.is_bound and scores.nll.dtype == torch.float64 and scores.nll.shape == (batch,)
    per_token = scores.nll.sum().item() / x0.numel()
    stderr = scores.nll_var.sum().sqrt().item() / x0.numel()
    log_v = math.log(vocab_size)
    assert abs(per_token - log_v) < 4 * stderr
    assert abs(per_token - log_v) < 0.02 * log_v
    assert stderr < 0.01 * log_v  # the check above is not vacuous


def test_uniform_predictions_ar_nll_is_log_vocab_exactly(build):
    vocab_size, length = 50, 16
    objective = build(vocab_size=vocab_size, seq_len=length, objective="ar").model.objective
    x0 = torch.randint(0, vocab_size, (8, length), generator=gen(0))
    scores = objective.score(ZeroLogits(vocab_size), x0, generator=gen(1), t_samples=1)
    assert not scores.is_bound
    exact = torch.full((8,), length * math.log(vocab_size), dtype=torch.float64)
    torch.testing.assert_close(scores.nll, exact)
    loss, _ = objective.loss(ZeroLogits(vocab_size), x0, gen(2))
    assert loss.item() == pytest.approx(math.log(vocab_size), rel=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_uniform_predictions_training_loss_is_log_vocab(build, schedule):
    """E[loss] = ln|V| * alpha(t_eps) / (1 - t_eps): t is drawn from [t_eps, 1], w(t) unchanged."""
    vocab_size, length, calls = 50, 16, 300
    objective = build(vocab_size=vocab_size, seq_len=length, schedule=schedule).model.objective
    net, g = ZeroLogits(vocab_size), gen(0)
    losses = []
    for _ in range(calls):
        x0 = torch.randint(0, vocab_size, (32, length), generator=g)
        loss, stats = objective.loss(net, x0, g)
        losses.append(loss.item())
    losses = torch.tensor(losses, dtype=torch.float64)
    mean, stderr = losses.mean().item(), (losses.std() / math.sqrt(calls)).item()
    eps = objective.config.t_eps
    alpha_eps = objective.corruption.schedule.alpha(torch.tensor(eps, dtype=torch.float64)).item()
    expected = math.log(vocab_size) * alpha_eps / (1.0 - eps)
    assert abs(mean - expected) < 4 * stderr
    assert abs(mean - math.log(vocab_size)) < 0.02 * math.log(vocab_size)
    assert stats["bucket_count"].sum().item() == 32  # one t per sequence


# --- an exact denoiser: the NELBO of every sequence is -log p(x) ------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_exact_denoiser_nelbo_equals_nll(registry, build, exact_denoiser, schedule):
    """With the true conditionals the bound is tight for every single sequence (docs/maths.md section 1)."""
    vocab_size, length = 3, 4
    support, probs = toy_distribution(vocab_size, length, seed=0)
    built = build(vocab_size=vocab_size, seq_len=length, schedule=schedule)
    oracle = exact_denoiser(support, probs, vocab_size, built.vocab.mask_id)
    repeats = 4  # 4 x 500 stratified t per sequence
    scores = built.model.objective.score(
        oracle, support.repeat_interleave(repeats, 0), generator=gen(1), t_samples=500
    )
    nelbo = scores.nll.view(-1, repeats).mean(1)
    var = scores.nll_var.view(-1, repeats).sum(1) / repeats**2
    truth = -probs.log()
    z = (nelbo - truth) / var.sqrt()
    assert z.abs().max() < 4.5, f"worst sequence {z.abs().argmax()}: z = {z.abs().max():.2f}"
    # averaged over the data the bound equals the entropy
    entropy = (probs * truth).sum().item()
    estimate = (probs * nelbo).sum().item()
    stderr = (probs**2 * var).sum().sqrt().item()
    assert abs(estimate - entropy) < 4 * stderr and stderr < 0.02 * entropy


@pytest.mark.parametrize("bos_id", [0, 2])
def test_exact_ar_model_nll_equals_nll(build, exact_next_token, bos_id):
    """AR scores all N tokens, the first one from BOS: the exact model gives -log p(x)."""
    vocab_size, length = 3, 4
    support, probs = toy_distribution(vocab_size, length, seed=0)
    objective = build(vocab_size=vocab_size, seq_len=length, objective="ar", bos_id=bos_id).model.objective
    oracle = exact_next_token(support, probs, vocab_size, bos_id)
    scores = objective.score(oracle, support, generator=gen(0), t_samples=1)
    torch.testing.assert_close(scores.nll, -probs.log(), rtol=1e-5, atol=1e-5)


class Spy(nn.Module):
    """Uniform predictions; remembers what it was shown."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.inputs = vocab_size, []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros(*x.shape, self.vocab_size)


def test_ar_objective_predicts_token_i_from_bos_and_the_tokens_before_it(build):
    objective = build(vocab_size=50, seq_len=16, objective="ar", bos_id=7).model.objective
    x0 = torch.randint(0, 50, (4, 16), generator=gen(0))
    spy = Spy(50)
    objective.loss(spy, x0, gen(1))
    objective.score(spy, x0, generator=gen(1), t_samples=1)
    expected = torch.cat([torch.full((4, 1), 7), x0[:, :-1]], dim=1)
    assert len(spy.inputs) == 2 and all(torch.equal(shown, expected) for shown in spy.inputs)


# --- a trained model --------------------------------------------------------------------------

TOY_V, TOY_N = 8, 8


@pytest.fixture(scope="module")
def trained(build):
    """A tiny diffusion Transformer trained on 4 sequences with probabilities .4 .3 .2 .1."""
    torch.manual_seed(0)
    support = torch.randint(0, TOY_V, (4, TOY_N), generator=gen(123))
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    built = build(vocab_size=TOY_V, seq_len=TOY_N, model={"d_model": 32, "n_heads": 4, "n_layers": 2})
    net, objective = built.model.net, built.model.objective
    score = dict(repeats=32, t_samples=32)
    init = weighted_nelbo(objective, net, support, probs, seed=7, **score)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = gen(0)
    for _ in range(300):
        x0 = support[torch.multinomial(probs, 64, replacement=True, generator=g)]
        loss, _ = built.model(x0, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    return dict(net=net, vocab=built.vocab, support=support, probs=probs, init=init)


def test_trained_nelbo_is_never_below_the_data_entropy(registry, trained):
    probs = trained["probs"]
    entropy = -(probs * probs.log()).sum().item()
    objective = make_objective(registry, trained["vocab"], "cosine")
    nelbo, stderr = weighted_nelbo(
        objective, trained["net"], trained["support"], probs, repeats=64, t_samples=64, seed=11
    )
    init_nelbo, _ = trained["init"]
    assert nelbo >= entropy - 3 * stderr, (nelbo, stderr, entropy)
    assert nelbo < 0.5 * init_nelbo  # training did something: the check is not vacuous
    assert nelbo < entropy + 0.5 * (init_nelbo - entropy)


class ScheduleWrapper:
    """A schedule that answers as `inner` does, except for what a subclass overrides."""

    def __init__(self, schedule):
        self.inner = schedule

    def __getattr__(self, name):
        return getattr(self.inner, name)


class BrokenWeight(ScheduleWrapper):
    """A schedule whose alpha is right but whose NELBO weight is not."""

    def __init__(self, schedule, weight):
        super().__init__(schedule)
        self.weight_fn = weight

    def weight(self, t):
        return self.weight_fn(t)


def test_nelbo_is_schedule_invariant(registry, trained):
    """Linear and cosine estimates of one model's NELBO agree within Monte Carlo error, and a
    wrong weight (w = 1, or the linear 1/t with cosine masking) is caught by that tolerance."""
    net, vocab = trained["net"], trained["vocab"]
    # the training sequences and unseen ones, where the model's predictions depend on t
    seqs = torch.cat([trained["support"], torch.randint(0, TOY_V, (12, TOY_N), generator=gen(5))])
    weights = torch.full((len(seqs),), 1.0 / len(seqs))
    kw = dict(repeats=16, t_samples=64)
    a, se_a = weighted_nelbo(make_objective(registry, vocab, "linear"), net, seqs, weights, seed=21, **kw)
    b, se_b = weighted_nelbo(make_objective(registry, vocab, "cosine"), net, seqs, weights, seed=22, **kw)
    tolerance = 4 * math.hypot(se_a, se_b)
    assert abs(a - b) < tolerance, (a, b, tolerance)

    cosine = make_objective(registry, vocab, "cosine").corruption.schedule
    broken = {
        "unweighted": BrokenWeight(cosine, torch.ones_like),
        "linear weight, cosine masking": BrokenWeight(cosine, lambda t: 1.0 / t),
    }
    for name, schedule in broken.items():
        c, se_c = weighted_nelbo(make_objective(registry, vocab, schedule), net, seqs, weights, seed=23, **kw)
        assert abs(c - b) > 4 * math.hypot(se_b, se_c), f"{name} weight not caught: {c} vs {b}"


def test_evaluation_draws_t_under_cosine_for_uniform_masking(registry, trained):
    """The default evaluation scores a linear-schedule run with cosine's estimator: the same
    NELBO within error, and a smaller spread across seeds (its variance is finite)."""
    net, vocab = trained["net"], trained["vocab"]
    seqs = torch.cat([trained["support"], torch.randint(0, TOY_V, (12, TOY_N), generator=gen(5))])
    weights = torch.full((len(seqs),), 1.0 / len(seqs))
    linear = make_objective(registry, vocab, "linear")
    default = make_objective(registry, vocab, "linear")
    default.config = default.config.model_copy(update={"eval_schedule": "cosine"})
    assert default.evaluation_corruption().schedule.__class__.__name__ == "CosineSchedule"
    assert default.score(net, seqs[:2], generator=gen(0), t_samples=2).estimator == "cosine"
    assert "heavy-tailed" in linear.score(net, seqs[:2], generator=gen(0), t_samples=2).estimator
    kw = dict(repeats=16, t_samples=64)
    a, se_a = weighted_nelbo(linear, net, seqs, weights, seed=31, **kw)
    b, se_b = weighted_nelbo(default, net, seqs, weights, seed=32, **kw)
    assert abs(a - b) < 4 * math.hypot(se_a, se_b), (a, b)


def systematic_draws(f, sd, k: int, b: int, seed: int):
    """K draws per sequence as `score` makes them: t_k = (u + k/K) mod 1, value f(t) + noise."""
    g = gen(seed)
    u = torch.rand(b, generator=g, dtype=torch.float64)
    times = torch.stack([(u + i / k) % 1.0 for i in range(k)])
    return f(times) + sd(times) * torch.randn(k, b, generator=g, dtype=torch.float64), times


HUMP = lambda t: 1200 * torch.sin(torch.pi * t) ** 2  # noqa: E731 - smooth, 0 at both ends
SKEWED = lambda t: 9000 * t * (1 - t) ** 2  # noqa: E731 - the quick model's shape: kinks at the ends
NOISE = {"flat": lambda t: 100 + 0 * t,  # noqa: E731
         "quick": lambda t: 5 + 230 * t**0.4 * (1 - t) ** 1.5}  # noqa: E731 - the mask noise it measured


@pytest.mark.parametrize("integrand, noise", [(HUMP, "flat"), (SKEWED, "flat"), (SKEWED, "quick"), (HUMP, "quick")])
@pytest.mark.parametrize("k", [8, 16])
def test_stratified_variance_matches_the_real_spread_of_the_mean(integrand, noise, k):
    """Integrands shaped like the cosine NELBO's (0 at t = 0 and 1) with noise that changes along
    t: the estimated variance of a sequence's mean of K draws equals the variance of that mean
    over many sequences (drawn the same way), within 20% at K = 8 and 10% at K = 16."""
    from tdlm.builtins.objectives.diffusion import stratified_variance

    draws, times = systematic_draws(integrand, NOISE[noise], k, 40000, seed=k)
    real = draws.mean(0).var().item()
    assert stratified_variance(draws, times).mean().item() == pytest.approx(real, rel=0.2 if k == 8 else 0.1)
    # Shuffling the draws' order must not change it: the estimate orders them by t itself.
    shuffled = torch.randperm(k, generator=gen(1))
    assert torch.allclose(stratified_variance(draws[shuffled], times[shuffled]), stratified_variance(draws, times))


def test_stratified_variance_with_fewer_draws_than_a_window_is_conservative():
    from tdlm.builtins.objectives.diffusion import stratified_variance

    for k in (3, 4):
        draws, times = systematic_draws(HUMP, NOISE["flat"], k, 40000, seed=k)
        assert stratified_variance(draws, times).mean().item() > draws.mean(0).var().item()


def test_stratified_variance_of_two_draws_and_of_one():
    from tdlm.builtins.objectives.diffusion import stratified_variance

    pair, pair_t = systematic_draws(lambda t: 0 * t, lambda t: 0 * t + 1, 2, 40000, seed=3)
    assert stratified_variance(pair, pair_t).mean().item() == pytest.approx(0.5, rel=0.03)
    assert stratified_variance(pair[:1], pair_t[:1]) is None


def test_score_is_reproducible_with_a_fixed_seed(build):
    built = build(vocab_size=TOY_V, seq_len=TOY_N)
    x0 = torch.randint(0, TOY_V, (4, TOY_N), generator=gen(0))
    first = built.model.objective.score(built.model.net, x0, generator=gen(3), t_samples=8)
    again = built.model.objective.score(built.model.net, x0, generator=gen(3), t_samples=8)
    other = built.model.objective.score(built.model.net, x0, generator=gen(4), t_samples=8)
    assert torch.equal(first.nll, again.nll) and not torch.equal(first.nll, other.nll)


def test_score_draws_stratified_t_for_each_sequence(build):
    """K t per sequence, one in each [k/K, (k+1)/K) (docs/maths.md section 1: variance reduction)."""
    built = build(vocab_size=TOY_V, seq_len=TOY_N, objective={"name": "diffusion", "eval_schedule": "recipe"})
    objective = built.model.objective
    corruption, seen = objective.corruption, []
    corrupt = corruption.corrupt

    def recording_corrupt(x0, t, generator):
        seen.append(t.clone())
        return corrupt(x0, t, generator)

    corruption.corrupt = recording_corrupt
    x0 = torch.randint(0, TOY_V, (5, TOY_N), generator=gen(0))
    objective.score(ZeroLogits(TOY_V), x0, generator=gen(1), t_samples=16)
    times = torch.stack(seen, dim=1)  # [B, K]
    assert times.shape == (5, 16)
    for row in times:
        assert torch.equal(torch.sort((row * 16).floor().long()).values, torch.arange(16))
    assert len(set(times[:, 0].tolist())) == 5  # each sequence has its own offset


# --- the forward process ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_corrupt_masks_a_fraction_one_minus_alpha(build, schedule):
    built = build(vocab_size=50, seq_len=64, schedule=schedule)
    corruption, mask_id = built.model.objective.corruption, built.vocab.mask_id
    x0 = torch.randint(0, 50, (2000, 64), generator=gen(0))
    g = gen(1)
    for t_value in [0.05, 0.2, 0.5, 0.8, 0.95]:
        t = torch.full((2000,), t_value)
        xt = corruption.corrupt(x0, t, g)
        masked = xt == mask_id
        assert torch.equal(xt[~masked], x0[~masked])  # a position is masked or left alone
        expected = 1.0 - corruption.schedule.alpha(torch.tensor(t_value, dtype=torch.float64)).item()
        sigma = math.sqrt(expected * (1 - expected) / masked.numel())
        assert abs(masked.double().mean().item() - expected) < 5 * sigma, t_value
        # and independently per position: the count per sequence is Binomial(N, 1 - alpha)
        per_seq_var = masked.sum(-1).double().var().item()
        assert per_seq_var == pytest.approx(64 * expected * (1 - expected), rel=0.15)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_corrupt_endpoints(build, schedule):
    built = build(vocab_size=50, seq_len=64, schedule=schedule)
    corruption, mask_id = built.model.objective.corruption, built.vocab.mask_id
    x0 = torch.randint(0, 50, (500, 64), generator=gen(0))
    for dtype in (torch.float32, torch.float64):
        at_zero = corruption.corrupt(x0, torch.zeros(500, dtype=dtype), gen(1))
        assert torch.equal(at_zero, x0)
        tiny = corruption.corrupt(x0, torch.full((500,), 1e-6, dtype=dtype), gen(1))
        assert (tiny == mask_id).sum() <= 2
        at_one = corruption.corrupt(x0, torch.ones(500, dtype=dtype), gen(1))
        assert (at_one == mask_id).all()


def test_nelbo_terms_are_zero_where_unmasked(build):
    built = build(vocab_size=50, seq_len=32, schedule="cosine")
    corruption, mask_id = built.model.objective.corruption, built.vocab.mask_id
    x0 = torch.randint(0, 50, (64, 32), generator=gen(0))
    t = torch.rand(64, generator=gen(1), dtype=torch.float64)
    xt = corruption.corrupt(x0, t, gen(2))
    logits = 5 * torch.randn(64, 32, 50, generator=gen(3))
    terms = corruption.nelbo_terms(Denoised.from_logits(logits, xt, mask_id), x0, xt, t)
    masked = xt == mask_id
    assert masked.any() and (~masked).any()
    assert (terms[~masked] == 0).all()
    ce = -torch.log_softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
    expected = corruption.schedule.weight(t)[:, None] * ce
    torch.testing.assert_close(terms[masked].double(), expected[masked], rtol=1e-5, atol=1e-5)


# --- variance reduction -----------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 7, 64, 1000])
def test_stratified_times_put_one_t_in_each_stratum(batch):
    g = gen(batch)
    offsets = []
    for _ in range(20):
        t = stratified_times(batch, g)
        assert t.shape == (batch,) and ((t >= 0) & (t < 1)).all()
        strata = torch.sort((t.double() * batch).floor().long()).values
        assert torch.equal(strata, torch.arange(batch))
        offsets.append(t.min().item() * batch)  # u * B: the shared offset within a stratum
    assert len(set(offsets)) == 20  # a fresh offset each call
    assert 0.2 < sum(offsets) / 20 < 0.8


class GenericMaskRate(ScheduleWrapper):
    """A schedule whose mask rate is the interface's default 1 - alpha(t) (as before mask_rate)."""

    def mask_rate(self, t):
        return 1.0 - self.inner.alpha(t)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "geometric"])
def test_accurate_mask_rate_leaves_the_evaluation_unchanged(registry, schedule):
    """The closed-form mask rates change nothing at ordinary t: the same seed gives the same masks
    and the same NELBO as 1 - alpha(t), to rounding, for uniform and state-dependent masking."""
    from tdlm.components import VocabInfo

    vocab = VocabInfo(size=20, mask_id=20, bos_id=0)
    x0 = torch.randint(0, 20, (32, 24), generator=gen(0))
    logits = 3 * torch.randn(20, generator=gen(1))
    net = lambda x: logits.expand(*x.shape, 20) + (x == 20)[..., None] * torch.arange(20.0) / 20  # noqa: E731
    for name, options in (("uniform", {}), ("state-dependent", {"weights": "constant", "value": 1.5})):
        figures = []
        for wrap in (lambda s: s, GenericMaskRate):
            schedule_cls = registry.get("schedule", schedule).cls
            corruption_cls = registry.get("corruption", name).cls
            corruption = corruption_cls(corruption_cls.Config(**options), vocab=vocab,
                                        schedule=wrap(schedule_cls(schedule_cls.Config())))
            objective_cls = registry.get("objective", "diffusion").cls
            objective = objective_cls(objective_cls.Config(eval_schedule="recipe"), corruption=corruption, vocab=vocab)
            scores = objective.score(net, x0, generator=gen(2), t_samples=8)
            figures.append((scores.nll, scores.extras["bucket_masked"]))
        (nll, masked), (generic_nll, generic_masked) = figures
        assert torch.equal(masked, generic_masked)  # the same masks were drawn
        torch.testing.assert_close(nll, generic_nll, rtol=1e-12, atol=0)


class MaskRateOnly(ScheduleWrapper):
    """The linear schedule whose alpha must not be called: what uses 1 - alpha_t must ask
    mask_rate (exact near t = 0), not compute 1 - alpha(t) itself."""

    def alpha(self, t):
        raise AssertionError("1 - alpha(t) computed outside the schedule: use schedule.mask_rate(t)")


@pytest.mark.parametrize("corruption", ["uniform", "state-dependent", "cart"])
def test_the_built_in_corruptions_and_objective_ask_the_schedule_for_the_mask_rate(registry, corruption):
    from tdlm.components import VocabInfo

    vocab = VocabInfo(size=20, mask_id=20, bos_id=0)
    linear = registry.get("schedule", "linear").cls
    corruption_cls = registry.get("corruption", corruption).cls
    built = corruption_cls(corruption_cls.Config(), schedule=MaskRateOnly(linear(linear.Config())), vocab=vocab)
    objective_cls = registry.get("objective", "diffusion").cls
    objective = objective_cls(objective_cls.Config(eval_schedule="recipe"), corruption=built, vocab=vocab)
    x0 = torch.randint(0, 20, (4, 12), generator=gen(0))
    net = ZeroLogits(20)
    assert torch.isfinite(objective.score(net, x0, generator=gen(1), t_samples=3).nll).all()
    assert torch.isfinite(objective.loss(net, x0, gen(2))[0])
    probs = torch.full((4, 12, 20), 1 / 20, dtype=torch.float64)
    t, s = torch.full((4,), 0.5, dtype=torch.float64), torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(built.reverse_unmask_probs(probs, x0, t, s).sum(-1), torch.full((4, 12), 0.5,
                                                                                             dtype=torch.float64))
