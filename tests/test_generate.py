"""The one generation path (tdlm.sampling.generate) and the one sampler choice (tdlm.sampling.select)
that `tdlm sample`, `tdlm gen-eval` and the trainer's samples share."""

from dataclasses import dataclass

import pytest
import torch

from tdlm.components import SampleOutput
from tdlm.config import RecipeError, RunConfig, resolve_components
from tdlm.sampling.generate import SamplerBug, generate, prompt_canvas
from tdlm.sampling.select import with_sampler

MASK = 4


@dataclass
class Letters:
    """A 4-token vocabulary: 'a' (id 0, also end-of-text), 'b', 'c', 'd'; the mask id is 4."""

    mask_id: int = MASK
    bos_id: int = 0

    def decode(self, ids):
        return "".join("abcd"[i] for i in ids)


class ByColumn:
    """Fills masked column j with token `tokens[j]`; records the rows of each call."""

    def __init__(self, tokens):
        self.tokens, self.calls = torch.tensor(tokens), []

    def sample(self, net, canvas, generator, *, positions=None):
        self.calls.append(len(canvas))
        return SampleOutput(tokens=torch.where(canvas == MASK, self.tokens, canvas), nfe=len(self.calls))


def test_prompt_canvas():
    assert prompt_canvas([2, 3], num=2, length=4, mask_id=MASK).tolist() == [[2, 3, MASK, MASK]] * 2
    assert prompt_canvas([], num=1, length=3, mask_id=MASK).tolist() == [[MASK] * 3]


def test_generate_fills_decodes_and_counts_in_batches():
    sampler = ByColumn([1, 2, 3, 1, 2])
    canvas = prompt_canvas([3, 3], num=5, length=5, mask_id=MASK)
    made = generate(None, sampler, canvas, torch.Generator(), Letters(), batch_size=2)
    assert sampler.calls == [2, 2, 1] and [out.nfe for out in made.outputs] == [1, 2, 3]
    assert made.tokens.tolist() == [[3, 3, 3, 1, 2]] * 5 and made.texts == ["dddbc"] * 5
    assert made.generated_tokens == 15 and made.tokens_per_s > 0 and made.seconds >= 0
    # gen-eval's texts leave the prompt out
    after_prompt = generate(None, ByColumn([1, 2, 3, 1, 2]), canvas, torch.Generator(), Letters(), text_from=2)
    assert after_prompt.texts == ["dbc"] * 5


def test_stop_at_eos_cuts_each_generated_span():
    canvas = torch.tensor([[MASK, MASK, MASK, 2, MASK, MASK]])
    made = generate(None, ByColumn([1, 0, 3, 0, 0, 1]), canvas, torch.Generator(), Letters(), stop_at_eos=True)
    assert made.tokens.tolist() == [[1, 0, 3, 2, 0, 1]]  # the tokens stay whole
    assert made.texts == ["bc"]  # each span up to its first end-of-text; the given 'c' kept


@pytest.mark.parametrize("broken", ["leaves a mask", "changes a given token"])
def test_a_sampler_that_leaves_masks_or_changes_given_tokens_is_a_bug(broken):
    tokens = [MASK, 1, 1] if broken == "leaves a mask" else [1, 1, 1]

    class Broken:
        def sample(self, net, canvas, generator, *, positions=None):
            return SampleOutput(tokens=torch.tensor(tokens).expand_as(canvas), nfe=1)

    canvas = prompt_canvas([2], num=2, length=3, mask_id=MASK)
    with pytest.raises(SamplerBug, match="a bug in the sampler"):
        generate(None, Broken(), canvas, torch.Generator(), Letters())


@pytest.fixture
def recipe(registry):
    cfg = RunConfig.model_validate({"sampler": {"name": "ancestral", "steps": 8}})
    return cfg, resolve_components(cfg, registry), registry


def options_of(chosen):
    component, options = chosen[1]["sampler"]
    return component.name, options


def test_the_recipes_sampler_keeps_its_options_another_starts_from_defaults(recipe):
    cfg, components, registry = recipe
    assert options_of(with_sampler(cfg, components, registry, None))[1].steps == 8
    name, options = options_of(with_sampler(cfg, components, registry, "ancestral", {"grid": "cosine"}))
    assert (name, options.steps, options.grid) == ("ancestral", 8, "cosine")
    name, options = options_of(with_sampler(cfg, components, registry, None, {"steps": 3}))
    assert (name, options.steps) == ("ancestral", 3)
    name, options = options_of(with_sampler(cfg, components, registry, "confidence"))
    assert (name, options.steps) == ("confidence", 128)  # not the recipe's 8: another sampler's defaults
    new_cfg, _ = with_sampler(cfg, components, registry, "confidence", {"steps": 4})
    assert new_cfg.sampler.name == "confidence" and new_cfg.sampler.options() == {"steps": 4}


def test_a_bad_choice_names_the_sampler_key(recipe):
    cfg, components, registry = recipe
    with pytest.raises(RecipeError, match=r"sampler\.name: unknown sampler 'ancestrl'.*did you mean 'ancestral'"):
        with_sampler(cfg, components, registry, "ancestrl")
    with pytest.raises(RecipeError, match=r"sampler\.stepz.*did you mean 'steps'"):
        with_sampler(cfg, components, registry, None, {"stepz": 2})
