"""Confidence and threshold samplers (docs/maths.md section 5), and what every sampler must keep.

Nets with known logits make each step's choice predictable; a spy records the canvas at every
call, so the tests see each step's commits.
"""

import math

import pytest
import torch
from scipy import stats

from nets import Spy
from toydata import template_canvas
from tdlm.sampling.grids import commit_count, time_grid



def gen(seed):
    return torch.Generator().manual_seed(seed)


class PositionLogits(torch.nn.Module):
    """Logits [N, V] per position, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: x.shape[1]].expand(x.shape[0], -1, -1)


def peaked_logits(confidence, vocab_size, seed=0):
    """Position j puts probability confidence[j] on one random token, the rest spread evenly."""
    p = torch.as_tensor(confidence, dtype=torch.float64)
    top = torch.randint(0, vocab_size, (len(p),), generator=gen(seed))
    probs = ((1 - p) / (vocab_size - 1))[:, None].expand(-1, vocab_size).clone()
    probs[torch.arange(len(p)), top] = p
    return probs.log(), top


def commits(seen, final, mask_id):
    """The positions each call's step committed (bool [calls, B, N]), from the spy's canvases."""
    after = seen[1:] + [final]
    return torch.stack([(x == mask_id) & (y != mask_id) for x, y in zip(seen, after)])


def assert_never_remasked(seen, final, mask_id):
    # calls on a subset of rows (ancestral recomputes only the rows that changed) cannot be lined
    # up with the others; test_ancestral_recomputes_only_changed_rows covers them
    canvases = [x for x in seen if x.shape == final.shape] + [final]
    for x, y in zip(canvases, canvases[1:]):
        committed = x != mask_id
        assert torch.equal(y[committed], x[committed])


# --- the grid's counts ------------------------------------------------------------------------


def test_commit_count_follows_the_grid_and_commits_at_least_one():
    start = torch.tensor([10, 10, 3, 0])
    now = torch.tensor([10, 4, 3, 0])
    k = commit_count(now, start, 0.75)  # round(7.5) = 8 stay masked (half to even)
    assert k.tolist() == [2, 1, 1, 0]  # a row ahead of the grid still commits one
    assert commit_count(now, start, 0.0).tolist() == now.tolist()  # the last step commits the rest


@pytest.mark.parametrize("grid, steps", [("uniform", 4), ("cosine", 5), ("uniform", 30)])
def test_confidence_commits_the_grids_count_most_confident_first(build, grid, steps):
    vocab_size, length = 7, 14
    built = build(vocab_size=vocab_size, seq_len=length,
                  sampler={"name": "confidence", "steps": steps, "grid": grid})
    mask_id = built.vocab.mask_id
    confidence = torch.linspace(0.3, 0.95, length)[torch.randperm(length, generator=gen(1))]
    logits, top = peaked_logits(confidence, vocab_size)
    canvas = torch.full((3, length), mask_id)
    canvas[:, [0, 5]] = 2  # fixed tokens are never counted or chosen
    spy = Spy(PositionLogits(logits))
    out = built.sampler.sample(spy, canvas, gen(0))
    free = canvas[0] == mask_id
    assert torch.equal(out.tokens[:, free], top[free].expand(3, -1))  # argmax tokens
    assert torch.equal(out.tokens[:, ~free], canvas[:, ~free])
    assert_never_remasked(spy.seen, out.tokens, mask_id)

    n, masked, t = int(free.sum()), int(free.sum()), time_grid(steps, grid).tolist()
    remaining = confidence.masked_fill(~free, -1.0)
    for i, step in enumerate(commits(spy.seen, out.tokens, mask_id)):
        k = masked - max(0, min(round(n * t[i + 1]), masked - 1))
        assert (step.sum(-1) == k).all()
        best = remaining.topk(k).indices
        assert step[0, best].all()
        remaining[best], masked = -1.0, masked - k
    assert masked == 0 and out.nfe == len(spy.seen) == min(steps, n)


def test_threshold_commits_every_confident_position_and_at_least_one(build):
    confidence = [0.95, 0.5, 0.92, 0.3, 0.97, 0.6, 0.91]
    built = build(vocab_size=5, seq_len=len(confidence), sampler={"name": "threshold", "tau": 0.9})
    mask_id = built.vocab.mask_id
    logits, top = peaked_logits(confidence, 5)
    spy = Spy(PositionLogits(logits))
    out = built.sampler.sample(spy, torch.full((2, len(confidence)), mask_id), gen(0))
    assert torch.equal(out.tokens, top.expand(2, -1))
    steps = commits(spy.seen, out.tokens, mask_id)[:, 0]
    assert [s.nonzero().flatten().tolist() for s in steps] == [[0, 2, 4, 6], [5], [1], [3]]
    assert out.nfe == 4


def test_threshold_max_steps_commits_the_rest_at_the_last_step(build):
    confidence = [0.95, 0.5, 0.92, 0.3, 0.6]
    built = build(vocab_size=5, seq_len=5, sampler={"name": "threshold", "tau": 0.9, "max_steps": 2})
    logits, top = peaked_logits(confidence, 5)
    spy = Spy(PositionLogits(logits))
    out = built.sampler.sample(spy, torch.full((1, 5), built.vocab.mask_id), gen(0))
    steps = commits(spy.seen, out.tokens, built.vocab.mask_id)[:, 0]
    assert [s.nonzero().flatten().tolist() for s in steps] == [[0, 2], [1, 3, 4]]
    assert out.nfe == 2 and torch.equal(out.tokens[0], top)


def test_sample_mode_draws_with_temperature_and_ranks_by_the_drawn_tokens_probability(build):
    """Position 1 puts 0.9 on token 0: when that token is drawn (its confidence 0.9 beats position
    0's 0.5) position 1 is committed first, otherwise (confidence 0.1 / 3) position 0 is."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3]], dtype=torch.float64)
    logits = probs.clamp_min(1e-12).log()
    for temperature in (1.0, 2.0):
        drawn = torch.softmax(logits / temperature, -1)
        options = {"name": "confidence", "mode": "sample", "temperature": temperature}
        two_steps = build(vocab_size=4, seq_len=2, sampler={**options, "steps": 2}).sampler
        spy = Spy(PositionLogits(logits))
        out = two_steps.sample(spy, torch.full((4000, 2), two_steps.vocab.mask_id), gen(0))
        first = commits(spy.seen, out.tokens, two_steps.vocab.mask_id)[0]
        assert (first.sum(-1) == 1).all() and (out.tokens[first[:, 1], 1] == 0).all()
        assert stats.binomtest(int(first[:, 1].sum()), 4000, float(drawn[1, 0])).pvalue > 1e-3

        one_step = build(vocab_size=4, seq_len=2, sampler={**options, "steps": 1}).sampler
        out = one_step.sample(PositionLogits(logits), torch.full((4000, 2), one_step.vocab.mask_id), gen(1))
        for position in (0, 1):
            counts = torch.bincount(out.tokens[:, position], minlength=4)
            keep = drawn[position] > 1e-4
            expected = drawn[position][keep] / drawn[position][keep].sum() * 4000
            assert stats.chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue > 1e-3


# --- the marginal trap (tests/test_samplers.py) -----------------------------------------------

WORDS = ["He", "likes", "apple", "I", "play", "tennis"]
SENTENCES = torch.tensor([[0, 1, 2], [3, 4, 5]])


def trap_run(build, exact_denoiser, sampler, batch=2000):
    built = build(vocab_size=len(WORDS), seq_len=3, sampler=sampler)
    oracle = exact_denoiser(SENTENCES, torch.tensor([0.5, 0.5]), len(WORDS), built.vocab.mask_id)
    out = built.sampler.sample(oracle, torch.full((batch, 3), built.vocab.mask_id), gen(0))
    hits = (out.tokens[:, None, :] == SENTENCES[None]).all(-1)
    return out, hits.sum(0), int((~hits.any(-1)).sum())


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
@pytest.mark.parametrize("mode", ["argmax", "sample"])
def test_confidence_one_token_per_step_gives_only_data_sentences(build, exact_denoiser, mode, grid):
    out, counts, mixed = trap_run(build, exact_denoiser, {"name": "confidence", "steps": 3, "mode": mode, "grid": grid})
    assert mixed == 0 and out.nfe == 3
    if mode == "sample":
        assert stats.chisquare(counts.numpy()).pvalue > 1e-3  # both sentences, half each


def test_confidence_all_tokens_in_one_step_falls_into_the_trap(build, exact_denoiser):
    """The contrast: drawn from the marginals in one step, 6 of the 8 combinations are mixed."""
    out, _, mixed = trap_run(build, exact_denoiser, {"name": "confidence", "steps": 1, "mode": "sample"})
    assert out.nfe == 1
    assert abs(mixed / 2000 - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 2000)


def test_threshold_commits_one_word_then_the_rest_at_once(build, exact_denoiser):
    """Every word has confidence 1/2 until one is chosen; then the sentence is certain."""
    out, counts, mixed = trap_run(build, exact_denoiser, {"name": "threshold", "tau": 0.9, "mode": "sample"})
    assert mixed == 0 and out.nfe == 2
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


# --- every sampler: fixed tokens kept, no mask left, commits final ----------------------------

V, N = 20, 16
DIFFUSION_SAMPLERS = [
    {"name": "ancestral", "steps": 8},
    {"name": "confidence", "steps": 5, "grid": "cosine"},
    {"name": "confidence", "steps": 16, "mode": "sample", "temperature": 0.8},
    {"name": "threshold", "tau": 0.2, "mode": "sample"},
    {"name": "semi-ar", "block": 5, "inner": "confidence", "inner_options": {"steps": 2}},
    {"name": "semi-ar", "block": 4, "inner": "threshold", "inner_options": {"tau": 0.5}},
    {"name": "semi-ar", "block": 6, "inner": "ancestral", "inner_options": {"steps": 3}},
]


@pytest.mark.parametrize("sampler", DIFFUSION_SAMPLERS, ids=lambda s: "-".join(map(str, s.values())))
def test_fixed_tokens_kept_no_mask_left_and_commits_are_final(build, sampler):
    torch.manual_seed(0)
    built = build(vocab_size=V, seq_len=N, sampler=sampler)
    mask_id = built.vocab.mask_id
    canvas, fixed = template_canvas(mask_id, V, N, batch=6)
    spy = Spy(built.model.net.eval())
    out = built.sampler.sample(spy, canvas, gen(0))
    assert torch.equal(out.tokens[:, fixed], canvas[:, fixed])
    assert ((out.tokens >= 0) & (out.tokens < V)).all()
    assert_never_remasked(spy.seen, out.tokens, mask_id)
    assert out.nfe == len(spy.seen) >= 1


def test_ar_sampler_keeps_a_template(build):
    torch.manual_seed(0)
    built = build(vocab_size=V, seq_len=N, objective="ar", sampler={"name": "ar", "stop_at_eos": True})
    canvas, fixed = template_canvas(built.vocab.mask_id, V, N, batch=6)
    out = built.sampler.sample(built.model.net.eval(), canvas, gen(0))
    assert torch.equal(out.tokens[:, fixed], canvas[:, fixed])
    assert ((out.tokens >= 0) & (out.tokens < V)).all()


@pytest.mark.parametrize("name", ["confidence", "threshold"])
def test_positions_limit_what_is_committed(build, name):
    torch.manual_seed(0)
    built = build(vocab_size=V, seq_len=N, sampler={"name": name})
    mask_id = built.vocab.mask_id
    canvas, fixed = template_canvas(mask_id, V, N, batch=6)
    positions = torch.zeros_like(canvas, dtype=torch.bool)
    positions[:, 3:6] = True
    out = built.sampler.sample(built.model.net.eval(), canvas, gen(0), positions=positions)
    free = canvas == mask_id
    assert not (out.tokens[free & positions] == mask_id).any()
    assert torch.equal(out.tokens[~positions], canvas[~positions])
    nothing = built.sampler.sample(built.model.net, out.tokens, gen(0), positions=positions)
    assert nothing.nfe == 0 and torch.equal(nothing.tokens, out.tokens)
