"""Samplers against docs/maths.md section 5: exact distributions, fixed tokens, NFE, filtering."""

import itertools
import math

import pytest
import torch
from scipy import stats
from nets import Spy
from toydata import template_canvas

from tdlm.components import sample_categorical
from tdlm.builtins.samplers.ancestral import time_grid
from tdlm.sampling.next_token import filter_probs



def gen(seed):
    return torch.Generator().manual_seed(seed)


def sequence_counts(tokens, support):
    """How often each support sequence occurs in `tokens` [B, N]; the rest is 'other'."""
    hits = (tokens[:, None, :] == support[None]).all(-1)  # [B, S]
    return hits.sum(0), int((~hits.any(-1)).sum())


def chisquare_pvalue(counts, probs):
    """Pearson chi-square goodness of fit, cells with expected count < 5 pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].sum().double().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


# --- the seed paper's "marginal trap" ---------------------------------------------------------

WORDS = ["He", "likes", "apple", "I", "play", "tennis"]
SENTENCES = torch.tensor([[0, 1, 2], [3, 4, 5]])  # "He likes apple", "I play tennis"


@pytest.fixture
def trap(build, exact_denoiser):
    def make(schedule, grid, steps):
        sampler = {"name": "ancestral", "steps": steps, "grid": grid}
        built = build(vocab_size=len(WORDS), seq_len=3, schedule=schedule, sampler=sampler)
        oracle = exact_denoiser(SENTENCES, torch.tensor([0.5, 0.5]), len(WORDS), built.vocab.mask_id)
        return built.sampler, oracle, built.vocab.mask_id

    return make


@pytest.mark.parametrize("schedule, grid", [("linear", "uniform"), ("cosine", "cosine")])
def test_one_token_per_step_reproduces_the_data(trap, schedule, grid):
    sampler, oracle, mask_id = trap(schedule, grid, steps=512)
    out = sampler.sample(oracle, torch.full((2000, 3), mask_id), gen(0))
    counts, mixed = sequence_counts(out.tokens, SENTENCES)
    assert mixed <= 0.01 * 2000  # only when two words happen to unmask in the same step
    assert chisquare_pvalue(counts, torch.tensor([0.5, 0.5])) > 1e-3
    assert out.nfe <= 512


@pytest.mark.parametrize("schedule, grid", [("linear", "uniform"), ("cosine", "cosine")])
def test_all_tokens_in_one_step_fall_into_the_marginal_trap(trap, schedule, grid):
    """Each word drawn from its own marginal: 6 of the 8 combinations are mixed ("He play apple")."""
    sampler, oracle, mask_id = trap(schedule, grid, steps=1)
    out = sampler.sample(oracle, torch.full((2000, 3), mask_id), gen(0))
    assert out.nfe == 1 and not (out.tokens == mask_id).any()
    _, mixed = sequence_counts(out.tokens, SENTENCES)
    share = mixed / 2000
    assert share > 0.5
    assert abs(share - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 2000)


def test_a_prompt_decides_the_sentence_even_in_one_step(trap):
    sampler, oracle, mask_id = trap("linear", "uniform", steps=1)
    canvas = torch.full((100, 3), mask_id)
    canvas[:50, 0] = 0  # "He ..."
    canvas[50:, 2] = 5  # "... tennis"
    out = sampler.sample(oracle, canvas, gen(0))
    assert torch.equal(out.tokens[:50], SENTENCES[0].expand(50, 3))
    assert torch.equal(out.tokens[50:], SENTENCES[1].expand(50, 3))


def random_distribution(vocab_size, length, seed):
    """Every one of the V^N sequences, with Dirichlet(0.5) probabilities."""
    support = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
    torch.manual_seed(seed)
    return support, torch.distributions.Dirichlet(torch.full((len(support),), 0.5)).sample().double()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ancestral_sampler_with_exact_denoiser_samples_the_distribution(build, exact_denoiser, schedule):
    vocab_size, length = 3, 3
    support, probs = random_distribution(vocab_size, length, seed=0)
    sampler = {"name": "ancestral", "steps": 512}
    built = build(vocab_size=vocab_size, seq_len=length, schedule=schedule, sampler=sampler)
    oracle = exact_denoiser(support, probs, vocab_size, built.vocab.mask_id)
    out = built.sampler.sample(oracle, torch.full((3000, length), built.vocab.mask_id), gen(1))
    counts, other = sequence_counts(out.tokens, support)
    assert other == 0
    assert chisquare_pvalue(counts, probs) > 1e-3


def test_ar_sampler_with_exact_model_samples_the_distribution(build, exact_next_token):
    vocab_size, length = 3, 4
    support, probs = random_distribution(vocab_size, length, seed=0)
    built = build(vocab_size=vocab_size, seq_len=length, objective="ar")
    oracle = exact_next_token(support, probs, vocab_size, built.vocab.bos_id)
    out = built.sampler.sample(oracle, torch.full((4000, length), built.vocab.mask_id), gen(1))
    assert out.nfe == length
    counts, other = sequence_counts(out.tokens, support)
    assert other == 0
    assert chisquare_pvalue(counts, probs) > 1e-3


# --- fixed tokens, no masks left, NFE ---------------------------------------------------------

V, N = 20, 16


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
@pytest.mark.parametrize("sampler_options", [{}, {"temperature": 0.7}])
def test_fixed_tokens_are_kept_and_every_mask_is_filled(build, objective, sampler_options):
    torch.manual_seed(0)
    name = "ancestral" if objective == "diffusion" else "ar"
    extra = {"steps": 16, "grid": "cosine"} if name == "ancestral" else {"top_k": 5, "top_p": 0.9}
    sampler = {"name": name, **extra, **sampler_options}
    built = build(vocab_size=V, seq_len=N, objective=objective, sampler=sampler)
    canvas, fixed = template_canvas(built.vocab.mask_id, V, N, batch=8)
    out = built.sampler.sample(built.model.net.eval(), canvas, gen(0))
    assert out.tokens.shape == canvas.shape
    assert torch.equal(out.tokens[:, fixed], canvas[:, fixed])
    assert ((out.tokens >= 0) & (out.tokens < V)).all()  # no mask id left, only real tokens
    if name == "ar":  # one call per column that has something to fill
        assert out.nfe == int((~fixed).sum())
    else:
        assert 1 <= out.nfe <= 16


def test_ancestral_nfe(build):
    torch.manual_seed(0)
    for steps in [1, 4, 64]:
        built = build(vocab_size=V, seq_len=N, sampler={"name": "ancestral", "steps": steps})
        canvas, fixed = template_canvas(built.vocab.mask_id, V, N, batch=1)
        out = built.sampler.sample(built.model.net.eval(), canvas, gen(steps))
        assert not (out.tokens == built.vocab.mask_id).any()
        # a call is made only when the canvas changed, i.e. at least one token was committed
        assert 1 <= out.nfe <= min(steps, int((~fixed).sum()))
        if steps == 1:
            assert out.nfe == 1
    full = torch.randint(0, V, (2, N), generator=gen(0))
    out = built.sampler.sample(built.model.net, full, gen(0))
    assert out.nfe == 0 and torch.equal(out.tokens, full)


def test_ancestral_recomputes_only_changed_rows(build):
    """The net is called on the rows whose canvas changed since their last call, and the tokens
    are those of recomputing every row at every step (a hand-written loop, same draws)."""
    torch.manual_seed(0)
    built = build(vocab_size=V, seq_len=N, sampler={"name": "ancestral", "steps": 24})
    net, mask_id, corruption = built.model.net.eval(), built.vocab.mask_id, built.model.objective.corruption
    canvas, _ = template_canvas(mask_id, V, N, batch=6)
    spy = Spy(net)
    out = built.sampler.sample(spy, canvas, gen(0))

    g, x, calls = gen(0), canvas.clone(), []
    grid = time_grid(24, "uniform", "cpu")
    changed = torch.ones(6, dtype=torch.bool)
    for i in range(24):
        masked = x == mask_id
        if not masked.any():
            break
        if changed.any():
            calls.append(x[changed].clone())
        probs = torch.softmax(net(x).double(), -1)  # every row, every step
        unmask = corruption.reverse_unmask_probs(probs, x, grid[i].expand(6), grid[i + 1].expand(6))
        moves = masked & (torch.rand(masked.shape, generator=g, dtype=torch.float64) < unmask.sum(-1))
        if moves.any():
            x[moves] = sample_categorical(unmask[moves], g)
        changed = moves.any(-1)
    assert torch.equal(out.tokens, x)
    assert out.nfe == len(spy.seen) == len(calls) < 24
    assert all(torch.equal(a, b) for a, b in zip(spy.seen, calls))
    assert any(len(a) < 6 for a in spy.seen)  # some calls did skip rows


def test_ar_sampler_top_k_1_is_greedy(build):
    torch.manual_seed(0)
    built = build(vocab_size=V, seq_len=N, objective="ar", sampler={"name": "ar", "top_k": 1})
    net = built.model.net.eval()
    canvas = torch.full((4, N), built.vocab.mask_id)
    canvas[:, :3] = torch.randint(0, V, (4, 3), generator=gen(1))
    out = built.sampler.sample(net, canvas, gen(2))
    greedy = canvas.clone()
    bos = torch.full((4, 1), built.vocab.bos_id)
    with torch.no_grad():
        for j in range(3, N):
            greedy[:, j] = net(torch.cat([bos, greedy[:, :j]], dim=1))[:, -1].argmax(-1)
    assert torch.equal(out.tokens, greedy)
    assert out.nfe == N - 3


class FixedLogits(torch.nn.Module):
    """The same logits at every position, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(*x.shape, -1)


@pytest.mark.parametrize("name", ["ancestral", "ar"])
def test_temperature_divides_the_logits(build, name):
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    objective = "diffusion" if name == "ancestral" else "ar"
    options = {"steps": 1} if name == "ancestral" else {}
    sampler = {"name": name, "temperature": 2.0, **options}
    built = build(vocab_size=4, seq_len=8, objective=objective, sampler=sampler)
    out = built.sampler.sample(FixedLogits(logits), torch.full((2000, 8), built.vocab.mask_id), gen(0))
    counts = torch.bincount(out.tokens.flatten(), minlength=4)
    expected = torch.softmax(logits.double() / 2.0, -1) * out.tokens.numel()
    assert stats.chisquare(counts.double().numpy(), expected.numpy()).pvalue > 1e-3


# --- categorical sampling and filtering -------------------------------------------------------


def test_sample_categorical_matches_the_distribution():
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.5], dtype=torch.float64)  # unnormalised, with a zero
    draws = sample_categorical(weights.expand(40_000, -1), gen(0))
    counts = torch.bincount(draws, minlength=len(weights))
    assert counts[4] == 0
    target = weights / weights.sum()
    keep = target > 0
    assert stats.chisquare(counts[keep].numpy(), (target[keep] * 40_000).numpy()).pvalue > 1e-3


def test_sample_categorical_is_exact_for_tiny_probabilities():
    """float64 sampling resolves probabilities that low-precision Gumbel-max would distort."""
    probs = torch.tensor([1e-3, 1.0 - 1e-3])
    draws = sample_categorical(probs.expand(200_000, -1), gen(1))
    rare = int((draws == 0).sum())
    assert abs(rare - 200) < 5 * math.sqrt(200)


def test_filter_probs_top_k():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1]])
    out = filter_probs(probs, top_k=2, top_p=None)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.4, 0.0, 0.3]))
    assert (out[1] > 0).sum() >= 2 and out[1, 2] == 0.4 and out[1, 3] == 0  # ties may be kept
    assert torch.equal(filter_probs(probs, top_k=4, top_p=None), probs)


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.1, [0.5]), (0.5, [0.5]), (0.6, [0.5, 0.25]), (0.75, [0.5, 0.25]), (0.8, [0.5, 0.25, 0.125]),
     (1.0, [0.5, 0.25, 0.125, 0.125])],
)
def test_filter_probs_top_p_keeps_the_smallest_set_with_mass_p(top_p, kept):
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25], dtype=torch.float64)  # exact binary fractions
    for scale in (1.0, 3.0):  # unnormalised input too
        out = filter_probs(probs * scale, top_k=None, top_p=top_p) / scale
        assert sorted(out[out > 0].tolist(), reverse=True) == kept
        assert torch.equal(out[out > 0], probs[out > 0])  # the kept entries are unchanged
    # the general rule on random rows: the kept set has mass >= p and dropping its least
    # likely member would leave mass < p
    rows = torch.rand(200, 7, generator=gen(0), dtype=torch.float64)
    rows = rows / rows.sum(-1, keepdim=True)
    out = filter_probs(rows, top_k=None, top_p=top_p)
    mass = out.sum(-1)
    smallest_kept = torch.where(out > 0, out, 2.0).amin(-1)
    assert (mass >= top_p - 1e-12).all()
    if top_p < 1.0:
        assert (mass - smallest_kept < top_p).all()


# --- time grid --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "cosine"])
def test_time_grid_runs_from_one_to_zero(kind):
    grid = time_grid(10, kind)
    assert grid.shape == (11,) and grid[0] == 1.0 and abs(grid[-1]) < 1e-12
    assert (grid.diff() < 0).all()
    i = torch.arange(11, dtype=torch.float64) / 10
    expected = 1.0 - i if kind == "uniform" else torch.cos(0.5 * math.pi * i) ** 2
    torch.testing.assert_close(grid, expected)
