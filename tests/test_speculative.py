"""Speculative samplers (docs/maths.md section 5): exactly the target sampler's distribution, fewer target calls.

The reference for `speculative` is the target's ancestral chain itself, enumerated: on V = 3
tokens and N = 3 positions there are (V + 1)^N = 64 canvases, so the chain's output distribution
is a product of T 64 x 64 transition matrices built with the corruption's own reverse kernel.
The reference for `ar-speculative` is the AR sampler's distribution, the product of the target's
(filtered) conditionals over all V^N sequences.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from click.testing import CliRunner
from scipy import stats
from toydata import toy_recipe, write_toy_corpus

from tdlm.cli import cli
from tdlm.components.draft import DraftError, check_draft
from tdlm.rundir import load_draft
from tdlm.sampling.grids import time_grid
from tdlm.sampling.next_token import filter_probs
from tdlm.builtins.samplers.speculative import sample_residual


V, N = 3, 3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_distribution(vocab_size, length, seed, concentration=0.5):
    support = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
    torch.manual_seed(seed)
    probs = torch.distributions.Dirichlet(torch.full((len(support),), concentration)).sample().double()
    return support, probs


class TableNet(torch.nn.Module):
    """An arbitrary fixed denoiser: random logits for every one of the (V + 1)^N canvases."""

    def __init__(self, vocab_size, length, seed, scale=2.0):
        super().__init__()
        self.base = vocab_size + 1
        table = torch.randn((self.base**length, length, vocab_size), generator=gen(seed)) * scale
        self.register_buffer("table", table)

    def forward(self, x):
        radix = self.base ** torch.arange(x.shape[1] - 1, -1, -1)
        return self.table[(x * radix).sum(-1)]


class Uniform(torch.nn.Module):
    """The worst reasonable draft: the same flat logits everywhere."""

    def forward(self, x):
        return torch.zeros(*x.shape, V)


def all_canvases(length):
    return torch.tensor(list(itertools.product(range(V + 1), repeat=length)))


def chain_distribution(sampler, net, canvas, positions=None):
    """Exact output distribution of the ancestral chain the sampler targets, from one canvas [N].

    Returns (states [S, N], probs [S]) over all (V + 1)^N canvases.
    """
    cfg, corruption, mask_id = sampler.config, sampler.objective.corruption, sampler.vocab.mask_id
    states = all_canvases(canvas.numel())
    allowed = torch.ones(canvas.numel(), dtype=torch.bool) if positions is None else positions
    with torch.no_grad():
        probs = torch.softmax(net(states).double() / cfg.temperature, -1)
    dist = (states == canvas).all(-1).double()
    grid = time_grid(cfg.steps, cfg.grid)
    for i in range(cfg.steps):
        t, s = grid[i].expand(len(states)), grid[i + 1].expand(len(states))
        unmask = corruption.reverse_unmask_probs(probs, states, t, s)
        kernel = torch.cat([unmask, (1 - unmask.sum(-1, keepdim=True)).clamp_min(0)], -1)
        kernel = kernel / kernel.sum(-1, keepdim=True)
        movable = (states == mask_id) & allowed
        kernel = torch.where(movable[..., None], kernel, torch.nn.functional.one_hot(states, V + 1).double())
        # M[a, b] = prod_n kernel[a, n, b_n]
        picked = kernel[:, None].expand(-1, len(states), -1, -1).gather(-1, states[None, ..., None].expand(
            len(states), -1, -1, 1)).squeeze(-1)
        dist = dist @ picked.prod(-1)
    return states, dist


def chisquare_pvalue(tokens, states, probs):
    """Pearson chi-square of the sampled canvases against `probs`, cells with expected < 5 pooled."""
    hits = (tokens[:, None, :] == states[None]).all(-1)
    assert hits.any(-1).all(), "a sample outside the enumerated canvases"
    counts = hits.sum(0).double()
    expected = probs * len(tokens)
    assert counts[expected == 0].sum() == 0, "a sample the chain cannot produce"
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    return stats.chisquare(observed.numpy(), (expected * observed.sum() / expected.sum()).numpy()).pvalue


def make_speculative(build, draft, *, schedule="linear", **options):
    sampler = {"name": "speculative", **options}
    built = build(vocab_size=V, seq_len=N, schedule=schedule, sampler=sampler)
    built.sampler.draft_net = draft
    return built.sampler, built.vocab.mask_id


def oracle(exact_denoiser, seed, mask_id=V):
    support, probs = random_distribution(V, N, seed)
    return exact_denoiser(support, probs, V, mask_id)


# --- speculative: the ancestral chain of the target, exactly --------------------------------------

CASES = {
    # name: (target, draft, schedule, options)
    "exact-target-close-draft": ("exact0", "exact0-perturbed", "linear", {"steps": 6, "draft_steps": 3}),
    "table-target-uniform-draft": ("table0", "uniform", "cosine", {"steps": 4, "draft_steps": 2, "grid": "cosine"}),
    "one-step-residual": ("table0", "table1", "linear", {"steps": 1, "draft_steps": 1}),
    # a short chain with a sharp state-dependent target: the step each row is at matters a lot
    "two-steps-sharp-target": ("sharp0", "uniform", "linear", {"steps": 2, "draft_steps": 1}),
    "temperatures": ("exact0", "table1", "cosine", {"steps": 5, "draft_steps": 4, "temperature": 0.7,
                                                    "draft_temperature": 1.5}),
}


def make_net(kind, exact_denoiser):
    if kind == "exact0":
        return oracle(exact_denoiser, 0)
    if kind == "exact0-perturbed":  # the same data distribution, mixed with another one
        support, probs = random_distribution(V, N, 0)
        _, other = random_distribution(V, N, 5)
        return exact_denoiser(support, 0.8 * probs + 0.2 * other, V, V)
    if kind == "uniform":
        return Uniform()
    return TableNet(V, N, seed=int(kind[-1]), scale=3.0 if kind.startswith("sharp") else 2.0)


@pytest.mark.parametrize("case", CASES)
def test_speculative_samples_the_target_chain_exactly(build, exact_denoiser, case):
    target_kind, draft_kind, schedule, options = CASES[case]
    target, draft = make_net(target_kind, exact_denoiser), make_net(draft_kind, exact_denoiser)
    sampler, mask_id = make_speculative(build, draft, schedule=schedule, **options)
    states, probs = chain_distribution(sampler, target, torch.full((N,), mask_id))
    assert abs(probs.sum() - 1) < 1e-9 and probs[(states == mask_id).any(-1)].sum() < 1e-12
    out = sampler.sample(target, torch.full((5000, N), mask_id), gen(1))
    assert not (out.tokens == mask_id).any()
    assert chisquare_pvalue(out.tokens, states, probs) > 1e-3
    st = out.stats
    assert st["residual_fallbacks"] == 0 and out.nfe == st["target_calls"] <= options["steps"]
    assert 0 < st["acceptance_rate"] <= 1 and st["draft_calls"] >= 1
    per_row = torch.tensor(st["target_calls_per_row"], dtype=torch.float64)
    assert per_row.max() <= options["steps"]
    if case == "exact-target-close-draft":  # a good draft saves most sequential target calls
        assert st["acceptance_rate"] > 0.9 and per_row.mean() < 0.3 * options["steps"]
    if draft_kind == "uniform":  # a bad draft: many rejections, still exact
        assert st["acceptance_rate"] < 0.8 and st["residual_draws"] > 0


@pytest.mark.parametrize("draft_kind", ["table1", "uniform"])
def test_speculative_is_exact_when_staying_masked_depends_on_mu(build, draft_kind):
    """State-dependent masking with unequal w_v: the probability that a position stays masked
    depends on mu, so the target's and the draft's differ in it too (under uniform masking they
    are equal and cancel in P/Q)."""
    from tdlm.builtins.corruptions.state_dependent import inverse_softplus

    built = build(vocab_size=V, seq_len=N, schedule="linear", corruption="state-dependent",
                  sampler={"name": "speculative", "steps": 3, "draft_steps": 2})
    with torch.no_grad():
        built.model.objective.corruption.param.copy_(inverse_softplus(torch.tensor([0.4, 1.0, 3.0])))
    built.sampler.draft_net = make_net(draft_kind, None)
    target = TableNet(V, N, seed=0)
    states, probs = chain_distribution(built.sampler, target, torch.full((N,), V))
    out = built.sampler.sample(target, torch.full((6000, N), V), gen(8))
    assert chisquare_pvalue(out.tokens, states, probs) > 1e-3
    assert out.stats["residual_draws"] > 0 and out.stats["residual_fallbacks"] == 0


def test_the_enumerated_chain_is_the_ancestral_samplers(build, exact_denoiser):
    """The reference itself, checked against the ancestral sampler (so both samplers agree)."""
    target = oracle(exact_denoiser, 0)
    built = build(vocab_size=V, seq_len=N, schedule="linear", sampler={"name": "ancestral", "steps": 6})
    states, probs = chain_distribution(built.sampler, target, torch.full((N,), V))
    out = built.sampler.sample(target, torch.full((3000, N), V), gen(2))
    assert chisquare_pvalue(out.tokens, states, probs) > 1e-3


def test_prompt_and_positions_are_respected_exactly(build, exact_denoiser):
    target, draft = oracle(exact_denoiser, 1), Uniform()
    sampler, mask_id = make_speculative(build, draft, steps=3, draft_steps=2)
    canvas = torch.tensor([mask_id, 2, mask_id])
    positions = torch.tensor([True, True, False])  # the last masked position may not be committed
    states, probs = chain_distribution(sampler, target, canvas, positions)
    out = sampler.sample(target, canvas.expand(2000, N).clone(), gen(3), positions=positions.expand(2000, N))
    assert (out.tokens[:, 1] == 2).all() and (out.tokens[:, 2] == mask_id).all()
    assert (out.tokens[:, 0] != mask_id).all()
    assert chisquare_pvalue(out.tokens, states, probs) > 1e-3


def test_a_perfect_draft_is_always_accepted(build):
    steps, k = 8, 3
    target = TableNet(V, N, seed=0)
    sampler, mask_id = make_speculative(build, target, steps=steps, draft_steps=k)
    out = sampler.sample(target, torch.full((200, N), mask_id), gen(4))
    assert out.stats["acceptance_rate"] == 1.0 and out.stats["residual_draws"] == 0
    # each round: one call, k drafted steps accepted, then a free step with the known mu
    assert max(out.stats["target_calls_per_row"]) <= -(-steps // (k + 1))


def test_full_canvas_and_determinism(build):
    target, draft = TableNet(V, N, seed=0), TableNet(V, N, seed=1)
    sampler, mask_id = make_speculative(build, draft, steps=4, draft_steps=2)
    full = torch.randint(0, V, (5, N), generator=gen(0))
    out = sampler.sample(target, full, gen(0))
    assert out.nfe == 0 and out.stats["draft_calls"] == 0 and torch.equal(out.tokens, full)
    canvas = torch.full((50, N), mask_id)
    a, b = sampler.sample(target, canvas, gen(7)), sampler.sample(target, canvas, gen(7))
    assert torch.equal(a.tokens, b.tokens) and a.stats == b.stats


def test_residual_sampler_draws_max_p_minus_q():
    """The rejection sampler for the whole-state residual, against the enumerated residual.

    Here the residual lives on (0, 1), (0, 2), (1, 1): it is not a product over positions, so
    per-position residuals would be wrong."""
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]], dtype=torch.float64)
    q = torch.tensor([[[0.3, 0.3, 0.4], [0.4, 0.3, 0.3]]], dtype=torch.float64)
    pairs = torch.tensor(list(itertools.product(range(3), repeat=2)))
    joint_p = p[0, 0][pairs[:, 0]] * p[0, 1][pairs[:, 1]]
    joint_q = q[0, 0][pairs[:, 0]] * q[0, 1][pairs[:, 1]]
    residual = (joint_p - joint_q).clamp_min(0)
    residual /= residual.sum()
    x = torch.full((4000, 2), 3)
    y, draws, fallback = sample_residual(p.expand(4000, -1, -1), q.expand(4000, -1, -1), x,
                                         torch.ones(4000, 2, dtype=torch.bool), gen(5), 10_000)
    assert not fallback.any()
    assert chisquare_pvalue(y, pairs, residual) > 1e-3
    tv = 0.5 * (joint_p - joint_q).abs().sum()
    assert abs(draws.double().mean() - 1 / tv) < 0.15 / tv  # geometric with success rate TV


def test_a_draft_is_required_and_must_fit(build):
    sampler, mask_id = make_speculative(build, None, steps=2)
    with pytest.raises(DraftError, match="needs a draft"):
        sampler.sample(Uniform(), torch.full((1, N), mask_id), gen(0))
    other = build(vocab_size=V + 1, seq_len=N).model.net
    with pytest.raises(DraftError, match="same tokenizer"):
        check_draft(other, sampler.vocab, N)
    short = build(vocab_size=V, seq_len=2).model.net
    with pytest.raises(DraftError, match="at most 2"):
        check_draft(short, sampler.vocab, N)
    causal = build(vocab_size=V, seq_len=N, objective="ar").model.net
    with pytest.raises(DraftError, match="causal"):
        check_draft(causal, sampler.vocab, N)


# --- ar-speculative: the AR sampler's distribution, exactly ----------------------------------------

AR_LEN = 4


def ar_distribution(target, length, prompt=None, temperature=1.0, top_k=None):
    """The AR sampler's exact output distribution: the product of its (filtered) conditionals."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=length)))
    if prompt is not None:
        seqs = seqs[(seqs[:, : len(prompt)] == prompt).all(-1)]
    with torch.no_grad():
        logits = target(torch.cat([torch.zeros(len(seqs), 1, dtype=torch.long), seqs[:, :-1]], 1))
    probs = filter_probs(torch.softmax(logits.double() / temperature, -1), top_k, None)
    probs = probs / probs.sum(-1, keepdim=True)
    cond = probs.gather(-1, seqs[..., None]).squeeze(-1)
    start = 0 if prompt is None else len(prompt)
    return seqs, cond[:, start:].prod(-1)


AR_CASES = {
    # name: (draft, options, prompt)
    "exact-draft-other-distribution": ("exact3", {"gamma": 3}, None),
    "uniform-draft": ("uniform", {"gamma": 2}, None),
    "table-draft-prompt-top-k": ("table", {"gamma": 4, "temperature": 0.8, "top_k": 2}, [1]),
    "close-draft": ("exact0", {"gamma": 3}, None),
}


@pytest.mark.parametrize("case", AR_CASES)
def test_ar_speculative_samples_the_ar_distribution_exactly(build, exact_denoiser, exact_next_token, case):
    draft_kind, options, prompt = AR_CASES[case]
    support, probs = random_distribution(V, AR_LEN, 0)
    built = build(vocab_size=V, seq_len=AR_LEN, objective="ar", sampler={"name": "ar-speculative", **options})
    target = exact_next_token(support, probs, V, built.vocab.bos_id)
    if draft_kind == "uniform":
        draft = Uniform()
    elif draft_kind == "table":
        draft = TableNet(V, AR_LEN, seed=2)
    else:  # a diffusion oracle of the same (exact0) or another (exact3) distribution
        draft = exact_denoiser(*random_distribution(V, AR_LEN, int(draft_kind[-1])), V, V)
    built.sampler.draft_net = draft
    canvas = torch.full((5000, AR_LEN), V)
    prompt_t = None if prompt is None else torch.tensor(prompt)
    if prompt is not None:
        canvas[:, : len(prompt)] = prompt_t
    out = built.sampler.sample(target, canvas, gen(6))
    seqs, expected = ar_distribution(target, AR_LEN, prompt_t, options.get("temperature", 1.0),
                                     options.get("top_k"))
    if prompt is not None:
        assert (out.tokens[:, : len(prompt)] == prompt_t).all()
    assert chisquare_pvalue(out.tokens, seqs, expected) > 1e-3
    to_fill = AR_LEN - (0 if prompt is None else len(prompt))
    per_row = torch.tensor(out.stats["target_calls_per_row"], dtype=torch.float64)
    assert per_row.max() <= to_fill and out.nfe <= to_fill
    assert per_row.min() >= -(-to_fill // (options["gamma"] + 1))
    if case == "close-draft":  # the draft knows the data: most tokens accepted, half the calls or fewer
        assert out.stats["acceptance_rate"] > 0.6 and per_row.mean() < 0.5 * to_fill


def test_ar_speculative_with_the_target_as_its_own_draft_fills_gamma_plus_one_per_call(build, exact_next_token):
    """A draft whose marginals are the target's own conditionals given a fixed prefix (here: a
    deterministic sequence) is always accepted: gamma + 1 tokens per target call."""
    support, probs = torch.tensor([[2, 0, 1, 1]]), torch.tensor([1.0])
    built = build(vocab_size=V, seq_len=AR_LEN, objective="ar", sampler={"name": "ar-speculative", "gamma": 3})
    built.sampler.draft_net = ExactDenoiserLike(support)
    target = exact_next_token(support, probs, V, built.vocab.bos_id)
    out = built.sampler.sample(target, torch.full((10, AR_LEN), V), gen(0))
    assert (out.tokens == support).all() and out.nfe == 1 and out.stats["acceptance_rate"] == 1.0


class ExactDenoiserLike(torch.nn.Module):
    """Point mass on one sequence at every position."""

    def __init__(self, seq):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(seq[0], V).double().clamp_min(1e-30).log()

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1)


# --- trained runs as drafts, through the command line ------------------------------------------------


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """Two diffusion runs (target and draft) and an AR run on the same toy corpus and tokenizer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        yield train_runs(tmp_path_factory.mktemp("spec"))


def train_runs(root):
    corpus = write_toy_corpus(root / "corpus")
    recipe = toy_recipe(root / "r.toml", corpus, root / "runs")
    ar_recipe = toy_recipe(root / "a.toml", corpus, root / "runs", objective="ar")
    fast = ["--set", "training.max_steps=4", "--set", "eval.final_splits=[]"]
    for path, name, seed in ((recipe, "target", 1), (recipe, "draft", 2), (ar_recipe, "ar", 3)):
        result = CliRunner().invoke(cli, ["run", str(path), "--set", f"run.name={name}", "--set", f"run.seed={seed}",
                                          *fast], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root / "runs"


@pytest.mark.parametrize("sampler, target", [("speculative", "target"), ("ar-speculative", "ar")])
def test_a_trained_run_drafts_from_the_command_line(trained_runs, sampler, target):
    draft = trained_runs / "draft"
    args = ["sample", str(trained_runs / target), "--sampler", sampler, "--option", f'draft="{draft}"',
            "--num", "3", "--length", "12", "--prompt", "the cat", "--json", "--device", "cpu"]
    if sampler == "speculative":
        args += ["--option", "steps=12", "--option", "draft_steps=3"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["sampler"] == sampler and len(out["samples"]) == 3
    assert all(text.startswith("the cat") for text in out["samples"])
    assert 1 <= out["nfe"] <= 12


def test_load_draft_rejects_an_autoregressive_run(trained_runs):
    loaded = load_draft(trained_runs / "draft")
    assert not loaded.net.causal and loaded.vocab.size == loaded.net.vocab_size
    with pytest.raises(DraftError, match="causal"):
        load_draft(trained_runs / "ar")
