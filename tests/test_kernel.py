"""The ancestral chain's reverse kernel (tdlm.sampling.kernel), which `ancestral` samples and
`speculative` drafts and verifies with: `draw` samples the law that `table` and `log_prob` state."""

import itertools

import pytest
import torch
from scipy import stats

from tdlm.sampling.kernel import ReverseKernel, denoiser_probs, reverse_kernel


V = 3  # real tokens; the mask id is V


def gen(seed):
    return torch.Generator().manual_seed(seed)


def two_positions():
    """One canvas of 2 masked positions: the first moves with probability 0.6, the second always
    (a last step, s = 0)."""
    unmask = torch.tensor([[[0.1, 0.2, 0.3], [0.5, 0.25, 0.25]]], dtype=torch.float64)
    return ReverseKernel(unmask), torch.full((1, 2), V), torch.ones(1, 2, dtype=torch.bool)


def test_draw_samples_the_law_of_table_and_log_prob():
    kernel, x, movable = two_positions()
    outcomes = torch.tensor(list(itertools.product(range(V + 1), repeat=2)))  # [16, 2]
    table = kernel.table()[0]
    assert torch.allclose(table.sum(-1), torch.ones(2, dtype=torch.float64))
    law = table[0][outcomes[:, 0]] * table[1][outcomes[:, 1]]
    many = ReverseKernel(kernel.unmask.expand(len(outcomes), -1, -1))
    log_prob = many.log_prob(outcomes, movable.expand(len(outcomes), -1))
    torch.testing.assert_close(log_prob.exp(), law)
    assert law[outcomes[:, 1] == V].sum() == 0  # the second position cannot stay masked

    n = 40_000
    y = ReverseKernel(kernel.unmask.expand(n, -1, -1)).draw(x.expand(n, -1), movable.expand(n, -1), gen(0))
    counts = (y[:, None, :] == outcomes[None]).all(-1).sum(0)
    assert counts.sum() == n and counts[law == 0].sum() == 0
    keep = law > 0
    assert stats.chisquare(counts[keep].numpy(), (law[keep] * n).numpy()).pvalue > 1e-3


def test_positions_that_may_not_move_are_copied_and_not_scored():
    kernel, x, _ = two_positions()
    x = torch.tensor([[V, 1]])
    movable = torch.tensor([[False, True]])
    for seed in range(20):
        y = kernel.draw(x, movable, gen(seed))
        assert y[0, 0] == V and y[0, 1] != V
        torch.testing.assert_close(kernel.log_prob(y, movable), kernel.table()[0, 1, y[0, 1]].log().view(1))


def test_an_unmask_mass_above_one_from_rounding_is_scaled_down():
    unmask = torch.tensor([[[0.5, 0.5 + 1e-12, 0.0]]], dtype=torch.float64)
    kernel = ReverseKernel(unmask)
    table = kernel.table()
    assert table[0, 0, V] == 0 and torch.allclose(table.sum(-1), torch.ones(1, 1, dtype=torch.float64))
    y = kernel.draw(torch.full((1, 1), V), torch.ones(1, 1, dtype=torch.bool), gen(0))
    assert y.item() in (0, 1)
    assert kernel.log_prob(y, torch.ones(1, 1, dtype=torch.bool)).exp().item() == pytest.approx(0.5)


def test_reverse_kernel_is_the_corruptions_step_at_the_denoisers_temperature(build):
    built = build(vocab_size=V, seq_len=2, schedule="cosine")
    corruption = built.model.objective.corruption
    logits = torch.randn(2, 2, V, generator=gen(1))
    x, t, s = torch.full((2, 2), V), torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.4, 0.0])
    kernel = reverse_kernel(corruption, denoiser_probs(logits, 0.5), x, t, s.double())
    probs = torch.softmax(logits.double() / 0.5, -1)
    torch.testing.assert_close(kernel.unmask, corruption.reverse_unmask_probs(probs, x, t, s.double()))
    assert torch.allclose(kernel.rows(torch.tensor([1])).unmask.sum(-1), torch.ones(1, 2, dtype=torch.float64))
