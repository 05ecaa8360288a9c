"""Tests of the fixed-count corruption: a template to copy for a plugin of your own.

Run them from this folder, with tdlm installed (the module here is found whether the plugin is
installed or not):

    cd examples/tdlm-fixed-count && python -m pytest -q

They check the three things every corruption must get right: its forward process, that its NELBO
is a bound with the right expectation (on a toy whose exact NLL is known), and that tdlm finds and
accepts it (registration, the recipe, what the other components need of it).
"""

import importlib.metadata
import math
from pathlib import Path

import pytest
import torch

import tdlm_fixed_count
from tdlm.plugin import (Denoised, DiffusionObjective, LinearSchedule, RunContext, VocabInfo, build_registry,
                         get_plugin_manager, plugin_api_problem, read_recipe, resolve_components)

from tdlm_fixed_count import FixedCountMasking

HERE = Path(__file__).resolve().parent.parent
V, N = 6, 10
VOCAB = VocabInfo(size=V, mask_id=V, bos_id=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def objective(corruption_cls=FixedCountMasking) -> DiffusionObjective:
    """The corruption with tdlm's diffusion objective, built as tdlm builds them (tdlm/lm.py)."""
    context = RunContext(seq_len=N, vocab=VOCAB)
    corruption = corruption_cls(corruption_cls.Config(), schedule=LinearSchedule(LinearSchedule.Config()),
                                vocab=VOCAB, context=context)
    # eval_schedule = "recipe": score with this corruption itself (the default may swap the schedule)
    return DiffusionObjective(DiffusionObjective.Config(eval_schedule="recipe"), corruption=corruption, vocab=VOCAB,
                              context=context)


# -- the forward process ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [N, 3])  # the model's N, and a shorter x0 (an evaluation's tail)
def test_corrupt_masks_exactly_ceil_t_n_positions_and_leaves_the_rest(length):
    corruption = objective().corruption
    x0 = torch.randint(0, V, (200, length), generator=gen(0))
    t = torch.rand(200, generator=gen(1))
    xt = corruption.corrupt(x0, t, gen(2))
    masked = xt == VOCAB.mask_id
    assert torch.equal(masked.sum(-1), torch.ceil(t.double() * length).long().clamp(1, length))
    assert torch.equal(xt[~masked], x0[~masked])


def test_the_masked_set_is_uniform_over_positions():
    corruption = objective().corruption
    x0 = torch.zeros(20_000, N, dtype=torch.long)
    masked = corruption.corrupt(x0, torch.full((20_000,), 0.25), gen(3)) == VOCAB.mask_id
    # ceil(2.5) = 3 of 10 positions each time: every position is masked with probability 0.3
    torch.testing.assert_close(masked.double().mean(0), torch.full((N,), 0.3, dtype=torch.float64), atol=0.015,
                               rtol=0)


# -- the NELBO ------------------------------------------------------------------------------------


def test_nelbo_of_uniform_predictions_is_n_ln_v_exactly():
    """Zero logits: every draw is (N / l) * l * ln V, whatever was masked: no Monte Carlo error."""
    x0 = torch.randint(0, V, (8, N), generator=gen(4))
    scores = objective().score(lambda x: torch.zeros(*x.shape, V), x0, generator=gen(5), t_samples=4)
    assert scores.is_bound
    torch.testing.assert_close(scores.nll, torch.full((8,), N * math.log(V), dtype=torch.float64))


class Unweighted(FixedCountMasking):
    """A wrong bound (the N / l weight forgotten): the negative control of the test below."""

    def nelbo_terms(self, denoised, x0, xt, t):
        return denoised.cross_entropy(x0)


@pytest.mark.parametrize("corruption_cls, exact", [(FixedCountMasking, True), (Unweighted, False)])
def test_nelbo_of_the_exact_denoiser_is_the_exact_nll(corruption_cls, exact):
    """Data of i.i.d. tokens from a known unigram p: the exact denoiser predicts p at every masked
    position, the NLL of a sequence is -sum log p(x_n), and the NELBO's expectation equals it (the
    bound is tight for the exact denoiser). Within 4 standard errors of the estimate; a wrong
    weight is caught by that tolerance."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    x0 = torch.multinomial(p, 64 * N, replacement=True, generator=gen(6)).view(64, N)
    exact_denoiser = lambda x: p.log().expand(*x.shape, V)  # noqa: E731 - log mu(v | x_t) = log p(v)
    scores = objective(corruption_cls).score(exact_denoiser, x0, generator=gen(7), t_samples=32)
    nll = -p.log().double()[x0].sum(-1)
    error = (scores.nll - nll).mean().item()
    stderr = scores.nll_var.sum().sqrt().item() / len(x0)
    assert 0 < stderr < 0.05 * nll.mean().item()
    assert (abs(error) < 4 * stderr) == exact, (error, stderr)


def test_nelbo_terms_weigh_the_masked_cross_entropy_by_n_over_l():
    """nelbo_terms on its own, with logits wrapped in a Denoised as training hands it one."""
    corruption = objective().corruption
    x0 = torch.randint(0, V, (3, N), generator=gen(9))
    t = torch.tensor([0.05, 0.5, 1.0])
    xt = corruption.corrupt(x0, t, gen(10))
    logits = torch.randn(3, N, V, generator=gen(11))
    terms = corruption.nelbo_terms(Denoised.from_logits(logits, xt, VOCAB.mask_id), x0, xt, t)
    masked = xt == VOCAB.mask_id
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    expected = ce * masked * (N / masked.sum(-1, keepdim=True))
    torch.testing.assert_close(terms, expected)


def test_reverse_step_is_the_linear_schedules():
    corruption = objective().corruption
    probs = torch.softmax(torch.randn(2, N, V, generator=gen(8)), -1)
    t, s = torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.0])
    unmask = corruption.reverse_unmask_probs(probs, torch.full((2, N), V), t, s)
    torch.testing.assert_close(unmask.sum(-1), torch.tensor([[0.25], [1.0]]).expand(2, N))


# -- tdlm finds and accepts it ------------------------------------------------------------------


def registry_with_this_plugin():
    """The built-ins plus this module, on a fresh plugin manager (nothing global)."""
    pm = get_plugin_manager(entry_points=False)
    pm.register(tdlm_fixed_count, name="fixed-count")
    pm.check_pending()  # a misspelt hook in this module is an error here, as when tdlm loads it
    return build_registry(pm)


def test_the_plugin_registers_its_corruption_and_fits_this_tdlm():
    assert plugin_api_problem(tdlm_fixed_count.TDLM_PLUGIN_API) is None
    component = registry_with_this_plugin().get("corruption", "fixed-count")
    assert component.cls is FixedCountMasking and component.plugin == "fixed-count"


def test_the_example_recipe_resolves_with_every_component_it_needs():
    """resolve_components also checks what the objective and sampler need of the corruption
    (the diffusion objective its bound, the ancestral sampler its reverse step)."""
    components = resolve_components(read_recipe(HERE / "recipe.toml"), registry_with_this_plugin())
    assert components["corruption"].component.cls is FixedCountMasking
    assert components["sampler"].component.name == "ancestral"


def test_the_installed_package_declares_the_entry_point():
    """Only when the package is installed (pip install examples/tdlm-fixed-count)."""
    found = [ep for ep in importlib.metadata.entry_points(group="tdlm") if ep.name == "fixed-count"]
    if not found:
        pytest.skip("tdlm-fixed-count is not installed")
    assert found[0].value == "tdlm_fixed_count"
    assert build_registry().get("corruption", "fixed-count").package == "tdlm-fixed-count"
