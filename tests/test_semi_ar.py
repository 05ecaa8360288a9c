"""Semi-autoregressive sampling: blocks left to right around an inner sampler, options nested."""

import tomllib
import types

import pytest
import torch
from pydantic import ValidationError

from nets import Spy, ZeroLogits
from tdlm import hookimpl
from tdlm.components import ComponentConfig, SampleOutput, Sampler
from tdlm.config import RecipeError, RunConfig, read_recipe, resolve_components, resolved_dict, to_toml
from tdlm.registry import build_registry, get_plugin_manager


V, N = 20, 16


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("inner, inner_options, nfe", [
    ("confidence", {"steps": 2}, 2 + 2 + 2),  # blocks 1, 2, 3: the inner sampler's 2 steps each
    ("threshold", {"tau": 1.0}, 2 + 4 + 3),  # one token per call: the masked positions of each block
    ("ancestral", {"steps": 3}, None),  # at most 3 calls per block
])
def test_nothing_right_of_the_current_block_is_committed(build, inner, inner_options, nfe):
    torch.manual_seed(0)
    block = 4
    sampler = {"name": "semi-ar", "block": block, "inner": inner, "inner_options": inner_options}
    built = build(vocab_size=V, seq_len=N, sampler=sampler)
    mask_id = built.vocab.mask_id
    canvas = torch.full((5, N), mask_id)
    canvas[:, :6] = torch.randint(0, V, (5, 6), generator=gen(1))  # a prompt: block 0 is given, block 1 half
    canvas[:, 13] = 3  # a fixed token right of everything generated so far
    spy = Spy(built.model.net.eval())
    out = built.sampler.sample(spy, canvas, gen(0))
    free = canvas == mask_id
    for x in spy.seen:  # the rows of one call (ancestral calls the net only on rows that changed)
        leftmost = torch.where(x == mask_id, torch.arange(N), N).amin()
        current = int(leftmost) // block  # the leftmost block still masked in any row
        right = torch.arange(N) >= (current + 1) * block
        assert (x[:, right & free[0]] == mask_id).all()  # right of the block: all still masked (rows alike)
        assert (x[:, : current * block] != mask_id).all()  # left of it: all final
    assert torch.equal(out.tokens[~free], canvas[~free]) and not (out.tokens == mask_id).any()
    assert out.nfe == len(spy.seen)
    if nfe is None:
        assert 3 <= out.nfe <= 3 * 3
    else:
        assert out.nfe == nfe


def test_one_block_over_the_whole_canvas_is_the_inner_sampler(build):
    inner = {"steps": 5, "mode": "sample", "grid": "cosine"}
    semi = build(vocab_size=V, seq_len=N, sampler={"name": "semi-ar", "block": N, "inner_options": inner})
    plain = build(vocab_size=V, seq_len=N, sampler={"name": "confidence", **inner})
    net = semi.model.net.eval()
    canvas = torch.full((4, N), semi.vocab.mask_id)
    a, b = semi.sampler.sample(net, canvas, gen(3)), plain.sampler.sample(net, canvas, gen(3))
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe == 5


def test_caller_positions_are_respected(build):
    built = build(vocab_size=V, seq_len=N, sampler={"name": "semi-ar", "block": 3, "inner_options": {"steps": 1}})
    canvas = torch.full((2, N), built.vocab.mask_id)
    positions = torch.zeros_like(canvas, dtype=torch.bool)
    positions[:, 2:7] = True  # blocks 0, 1, 2 overlap it
    out = built.sampler.sample(built.model.net.eval(), canvas, gen(0), positions=positions)
    assert (out.tokens[positions] != built.vocab.mask_id).all()
    assert (out.tokens[~positions] == built.vocab.mask_id).all()
    assert out.nfe == 3


def test_inner_options_are_validated_by_the_inner_config(registry):
    def resolve(sampler):
        cfg = RunConfig.model_validate({"sampler": sampler})
        return resolve_components(cfg, registry)

    components = resolve({"name": "semi-ar", "block": 8, "inner": "threshold", "inner_options": {"tau": 0.7}})
    options = components["sampler"].config
    assert options.inner_options == {"mode": "argmax", "temperature": 1.0, "tau": 0.7, "max_steps": 1024}
    with pytest.raises(RecipeError, match=r"sampler\.inner_options: unknown key 'stepz' \(did you mean 'steps'\?\)"):
        resolve({"name": "semi-ar", "inner_options": {"stepz": 3}})
    with pytest.raises(RecipeError, match=r"sampler\.inner_options: steps: Input should be greater"):
        resolve({"name": "semi-ar", "inner_options": {"steps": 0}})
    with pytest.raises(RecipeError, match=r"sampler\.inner: unknown sampler 'confidnce'.*did you mean 'confidence'"):
        resolve({"name": "semi-ar", "inner": "confidnce"})


def test_resolved_config_with_nested_options_is_valid_toml(tmp_path, registry):
    """The saved config.toml must read back as the same config (inner_options is an inline table)."""
    cfg = RunConfig.model_validate({"run": {"name": "r"},  # an inner sampler with options that may be None
                                  "sampler": {"name": "semi-ar", "inner": "speculative",
                                              "inner_options": {"draft_steps": 5}}})
    resolved = resolved_dict(cfg, resolve_components(cfg, registry))
    text = to_toml(resolved)
    assert 'inner_options = {draft = "none", draft_checkpoint = "best", draft_steps = 5' in text  # None: "none"
    (tmp_path / "r.toml").write_text(text)
    again = read_recipe(tmp_path / "r.toml")
    assert resolved_dict(again, resolve_components(again, registry)) == resolved
    assert tomllib.loads(text)["sampler"]["inner_options"]["draft_steps"] == 5


class FillWith(Sampler):
    """Fills every position it may commit with one token, in one call."""

    class Config(ComponentConfig):
        token: int = 1

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        net(canvas)
        fill = canvas == self.vocab.mask_id
        if positions is not None:
            fill &= positions
        return SampleOutput(tokens=torch.where(fill, self.config.token, canvas), nfe=1)


@hookimpl
def register_samplers(register):
    register("fill-with", FillWith)


def test_an_inner_sampler_registered_only_on_the_callers_registry(build):
    """semi-ar builds its inner sampler from the registry its options were validated against
    (validation context "registry"), not from the installed plugins."""
    pm = get_plugin_manager(entry_points=False)
    plugin = types.ModuleType("fill_plugin")
    plugin.register_samplers = register_samplers
    pm.register(plugin, name="fill-with")
    registry = build_registry(pm)
    semi = registry.get("sampler", "semi-ar")
    options = {"block": 4, "inner": "fill-with", "inner_options": {"token": 2}}
    config = semi.config_cls.model_validate(options, context={"registry": registry})
    assert config.inner_options == {"token": 2}
    built = build(vocab_size=V, seq_len=N)
    sampler = semi.cls(config, objective=built.model.objective, vocab=built.vocab)
    canvas = torch.full((3, N), built.vocab.mask_id)
    canvas[:, 5] = 7
    spy = Spy(ZeroLogits(V))
    out = sampler.sample(spy, canvas, gen(0))
    assert isinstance(sampler.inner, FillWith)
    assert out.nfe == len(spy.seen) == N // 4  # one call per block
    assert (out.tokens[:, 5] == 7).all() and (out.tokens[canvas == built.vocab.mask_id] == 2).all()
    # the installed plugins do not know it: validated without the caller's registry, it is unknown
    with pytest.raises(ValidationError, match="unknown sampler 'fill-with'"):
        semi.config_cls.model_validate(options)
    with pytest.raises(ValidationError, match="token: Input should be a valid integer"):
        semi.config_cls.model_validate({**options, "inner_options": {"token": "x"}}, context={"registry": registry})
