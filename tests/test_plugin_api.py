"""What a plugin may rely on (docs/plugins.md): the run context, what components need of each
other checked when a recipe is resolved, the plugin API version, and scoring a trained run under
another corruption or schedule (`tdlm.rundir.load_run(overrides=...)`).

Toy plugins are modules registered on a fresh manager, as in tests/test_plugins.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from toydata import toy_recipe, write_toy_corpus

import tdlm
import tdlm.plugin
from tdlm import hookimpl
from tdlm.builtins.corruptions.uniform import UniformMasking
from tdlm.builtins.objectives.diffusion import DiffusionObjective
from tdlm.components import ComponentConfig, Corruption, Objective, SampleOutput, Sampler, implements
from tdlm.config import RecipeError, RunConfig, resolve_components
from tdlm.evaluate import evaluate
from tdlm.lm import build_model
from tdlm.registry import build_registry, get_plugin_manager, plugin_api_problem
from tdlm.rundir import load_run


V = 30


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, function)
    return module


def registry_with(**components):
    """The built-ins plus toy components, e.g. corruption=[("toy", ToyCorruption)]."""
    hooks = {}
    for kind, entries in components.items():
        @hookimpl(specname=f"register_{kind}s")
        def hook(register, _entries=entries):
            for name, cls in _entries:
                register(name, cls)

        hooks[f"register_{kind}s_impl"] = hook
    pm = get_plugin_manager(entry_points=False)
    pm.register(plugin_module("toy_plugin", **hooks), name="toy-plugin")
    return build_registry(pm)


def recipe(**sections) -> RunConfig:
    raw = {"data": {"seq_len": 16}, "model": {"n_layers": 1, "d_model": 16, "n_heads": 2}}
    for key, value in sections.items():
        raw[key] = {"name": value} if isinstance(value, str) else value
    return RunConfig.model_validate(raw)


def vocab():
    from tdlm.components import VocabInfo

    return VocabInfo(size=V, mask_id=V, bos_id=0)


# -- 1. the run context ---------------------------------------------------------------------------


class PositionalMasking(UniformMasking):
    """Needs the model's N when it is built (a buffer over every position) and records the N of
    each x0 it is handed."""

    def __init__(self, config, *, schedule, vocab, context=None):
        super().__init__(config, schedule=schedule, vocab=vocab, context=context)
        self.register_buffer("position_rate", torch.ones(context.seq_len), persistent=False)
        self.lengths = []

    def corrupt(self, x0, t, generator):
        self.lengths.append(x0.shape[1])
        return super().corrupt(x0, t, generator)


class LegacyMasking(UniformMasking):
    """An `__init__` written before the context existed: it must still build."""

    def __init__(self, config, *, schedule, vocab):
        super().__init__(config, schedule=schedule, vocab=vocab)


def test_components_get_the_models_context_and_may_be_handed_shorter_sequences():
    registry = registry_with(corruption=[("positional", PositionalMasking), ("legacy", LegacyMasking)])
    cfg = recipe(corruption="positional", sampler={"name": "semi-ar", "block": 4, "inner": "ancestral"},
                 objective={"name": "diffusion", "eval_schedule": "recipe"})  # score with this very corruption
    built = build_model(cfg, resolve_components(cfg, registry), vocab())
    objective = built.model.objective
    context = objective.corruption.context
    assert context.seq_len == 16 and context.vocab == vocab()
    assert objective.context is context and built.sampler.context is context
    assert built.sampler.inner.context is context  # a sampler built by a sampler inherits it
    assert objective.corruption.position_rate.shape == (16,)
    # evaluation scores the tail of a split at its own length: N of x0 differs from seq_len
    seqs, tail = torch.randint(0, V, (3, 16)), torch.randint(0, V, (5,))
    evaluate(built.model, seqs, tail, num_bytes=lambda tokens: tokens.numel(), t_samples=2)
    assert set(objective.corruption.lengths) == {16, 5}

    cfg = recipe(corruption="legacy")
    legacy = build_model(cfg, resolve_components(cfg, registry), vocab()).model.objective.corruption
    assert legacy.context.seq_len == 16
    assert legacy.with_schedule(legacy.schedule).context is legacy.context


# -- 3. what components need of each other, checked when the recipe is resolved ------------------


class NoReverse(Corruption):
    """A forward process and a bound, but no reverse step."""

    def corrupt(self, x0, t, generator):
        return x0

    def nelbo_terms(self, denoised, x0, xt, t):
        return torch.zeros(x0.shape)


class NoBound(Corruption):
    def corrupt(self, x0, t, generator):
        return x0


class NeedsReverse(Sampler):
    needs_corruption = ("reverse_unmask_probs",)

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)


class Wrapping(Sampler):
    """Its needs depend on its options, as a sampler running another sampler's do."""

    class Config(ComponentConfig):
        reverse: bool = False

    @classmethod
    def requirements(cls, config):
        return {"corruption": ("reverse_unmask_probs",) if config.reverse else ()}

    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)


def test_implements_tells_an_override_from_the_base_placeholder():
    assert implements(UniformMasking, "reverse_unmask_probs") and not implements(NoReverse, "reverse_unmask_probs")
    assert implements(NoReverse, "nelbo_terms") and not implements(NoBound, "nelbo_terms")
    assert implements(NoBound, "training_terms")  # a base method with a working default counts
    assert implements(DiffusionObjective, "score") and not implements(Objective, "score")  # under @torch.no_grad
    assert not implements(NoBound, "no_such_method")


def test_a_sampler_needing_a_method_the_corruption_lacks_is_refused_when_resolved():
    registry = registry_with(corruption=[("no-reverse", NoReverse)],
                             sampler=[("needs-reverse", NeedsReverse), ("wrapping", Wrapping)])
    with pytest.raises(RecipeError) as info:
        resolve_components(recipe(corruption="no-reverse", sampler="needs-reverse"), registry)
    message = str(info.value)
    assert "sampler 'needs-reverse' (plugin 'toy-plugin'" in message
    assert "needs corruption.reverse_unmask_probs" in message
    assert "corruption 'no-reverse' (plugin 'toy-plugin'" in message and "does not implement" in message
    assert f"{__name__}.NoReverse" in message  # where to implement it
    # the same corruption with a sampler that needs nothing of it; the needing sampler with uniform
    resolve_components(recipe(corruption="no-reverse", sampler="confidence"), registry)
    resolve_components(recipe(corruption="uniform", sampler="needs-reverse"), registry)
    # needs that follow from the options
    resolve_components(recipe(corruption="no-reverse", sampler={"name": "wrapping"}), registry)
    with pytest.raises(RecipeError, match=r"sampler 'wrapping' .*needs corruption\.reverse_unmask_probs"):
        resolve_components(recipe(corruption="no-reverse", sampler={"name": "wrapping", "reverse": True}), registry)


def test_the_diffusion_objective_needs_a_bound_and_the_ar_objective_does_not():
    registry = registry_with(corruption=[("no-bound", NoBound)])
    with pytest.raises(RecipeError, match=r"objective 'diffusion' \(tdlm\) needs corruption\.nelbo_terms, which "
                                          r"corruption 'no-bound'"):
        resolve_components(recipe(corruption="no-bound"), registry)
    resolve_components(recipe(corruption="no-bound", objective="ar"), registry)


# -- 5. the plugin API version ----------------------------------------------------------------------


def test_plugin_api_version_requirements():
    assert tdlm.PLUGIN_API_VERSION == (1, 2) and tdlm.plugin.PLUGIN_API_VERSION == (1, 2)
    for ok in (None, "1", "1.0", "1.1", "1.2", 1, (1, 0), " 1 "):
        assert plugin_api_problem(ok) is None, ok
    assert "needs tdlm plugin API 2" in plugin_api_problem("2")
    assert "needs tdlm plugin API 1.3" in plugin_api_problem("1.3")  # a newer minor version than this tdlm's
    assert "is not a version" in plugin_api_problem("one")


def test_a_plugin_requiring_another_api_is_skipped_with_a_warning(monkeypatch):
    @hookimpl
    def register_corruptions(register):
        register("from-the-future", UniformMasking)

    future = plugin_module("fake_future", register_corruptions=register_corruptions)
    future.TDLM_PLUGIN_API = "2"
    current = plugin_module("fake_current", register_corruptions=register_corruptions)
    current.TDLM_PLUGIN_API = "1.0"
    monkeypatch.setitem(sys.modules, "fake_future", future)
    monkeypatch.setitem(sys.modules, "fake_current", current)
    entry_points = [importlib.metadata.EntryPoint("future", "fake_future", "tdlm")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: entry_points if group == "tdlm" else [])
    with pytest.warns(UserWarning, match=r"'future'.*was skipped: it needs tdlm plugin API 2, and this tdlm"):
        registry = build_registry(get_plugin_manager())
    assert "from-the-future" not in registry.names("corruption") and "uniform" in registry.names("corruption")
    assert "plugin API 2" in registry.failed["future"]

    entry_points[:] = [importlib.metadata.EntryPoint("current", "fake_current", "tdlm")]
    registry = build_registry(get_plugin_manager())
    assert registry.get("corruption", "from-the-future").plugin == "current" and registry.failed == {}


# -- 4. scoring a trained run under another corruption or schedule ---------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy run trained with state-dependent masking and learned weights (so its checkpoint holds
    a corruption parameter), and the token cache its tokenizer lives in."""
    root = tmp_path_factory.mktemp("plugin_api")
    extra = '[corruption]\nname = "state-dependent"\nweights = "learned"\n'
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDLM_CACHE_DIR", str(root / "cache"))
        recipe_path = toy_recipe(root / "sd.toml", write_toy_corpus(root / "toy"), root / "runs", extra=extra)
        result = CliRunner().invoke(cli_main(), ["run", str(recipe_path), "--set", "training.max_steps=4",
                                                 "--set", "logging.tensorboard=false"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root / "runs" / "sd", root / "cache"


def cli_main():
    from tdlm.cli import cli

    return cli


@pytest.fixture
def run_dir(trained, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained[1]))
    return trained[0]


def nelbo(loaded, seed: int = 0) -> torch.Tensor:
    """The run's NELBO of 8 validation sequences under its loaded components, one seed."""
    from tdlm.data import pack

    seqs, _ = pack(loaded.corpus.splits["valid"], loaded.cfg.data.seq_len)
    model = loaded.built.model
    return model.objective.score(model.net, seqs[:8], generator=torch.Generator().manual_seed(seed), t_samples=4).nll


def test_load_run_scores_the_network_under_another_corruption_and_schedule(run_dir):
    own = load_run(run_dir)
    assert own.overrides == {} and own.components["corruption"].component.name == "state-dependent"
    uniform = load_run(run_dir, overrides=["corruption.name=uniform"])
    assert type(uniform.built.model.objective.corruption) is UniformMasking
    assert uniform.overrides["corruption.name"] == ("state-dependent", "uniform")
    assert uniform.left_out == ["objective.corruption.param"]  # the learned weights of the replaced corruption
    nets = own.built.model.net.state_dict(), uniform.built.model.net.state_dict()
    assert all(torch.equal(nets[0][key], nets[1][key]) for key in nets[0])  # the run's network, whole
    assert not torch.allclose(nelbo(own), nelbo(uniform))  # its weights moved in training: another bound

    # the default evaluation of uniform masking draws t under cosine; so does the recipe's schedule set to cosine
    cosine = load_run(run_dir, overrides=["corruption.name=uniform", "schedule.name=cosine",
                                          "objective.eval_schedule=recipe"])
    assert type(cosine.built.model.objective.corruption.schedule).__name__ == "CosineSchedule"
    torch.testing.assert_close(nelbo(cosine), nelbo(uniform), rtol=1e-12, atol=0)
    linear = load_run(run_dir, overrides=["corruption.name=uniform", "objective.eval_schedule=recipe"])
    assert not torch.allclose(nelbo(linear), nelbo(uniform))  # the schedule override is not ignored

    # state-dependent with every w = 1 is uniform masking: the same masks and bound
    constant = load_run(run_dir, overrides=["corruption.weights=constant", "corruption.value=1.0"])
    assert constant.left_out == ["objective.corruption.param"] and constant.kept_initial == []
    torch.testing.assert_close(nelbo(constant), nelbo(linear), rtol=1e-5, atol=0)


def test_a_corruption_brought_in_keeps_its_own_parameters_and_options(run_dir):
    # switching the corruption drops the old one's options (weights = "learned") for the new one's defaults
    cart = load_run(run_dir, overrides=["corruption.p=0.5", "corruption.name=cart"])
    assert cart.components["corruption"].config.p == 0.5
    # the run's own corruption with its own weights: nothing left out
    assert load_run(run_dir, overrides=["sampler.steps=3"]).left_out == []


@pytest.mark.parametrize("override, message", [
    ("model.d_model=64", "its model, data, run and training settings are what it was trained with"),
    ("data.seq_len=8", "trained with"),
    ("training.lr=0.1", "trained with"),
    ("objective.name=ar", "objective 'ar' needs a causal network and .* trained a bidirectional one"),
    ("corruption.name=unifrom", "did you mean 'uniform'"),
])
def test_load_run_refuses_overrides_that_change_the_network(run_dir, override, message):
    with pytest.raises(RecipeError, match=message):
        load_run(run_dir, overrides=[override])


# -- 6. the example plugin's own tests, the template the guide points to ---------------------------


def test_the_example_plugin_ships_tests_that_pass():
    import os
    import subprocess

    example = Path(__file__).resolve().parent.parent / "examples" / "tdlm-fixed-count"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=example, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_every_import_path_the_guide_gives_exists():
    """docs/plugins.md's table of what a plugin imports, checked name by name: all of it from the
    front door, tdlm.plugin, and all of the front door in the table."""
    import importlib
    import re

    guide = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    section = guide.split("## What a plugin imports", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    listed = set()
    for names, where in rows:
        module = re.match(r"\s*`(?:from )?([\w.]+)", where).group(1)
        assert module == "tdlm.plugin", names
        for name in re.findall(r"`(\w+)`", names):
            assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
            listed.add(name)
    assert listed == set(tdlm.plugin.__all__)


def test_eval_set_scores_the_run_under_another_corruption_from_the_command_line(run_dir):
    from click.testing import CliRunner

    out = CliRunner().invoke(cli_main(), ["eval", str(run_dir), "--set", "corruption.name=uniform", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["overrides"]["corruption.name"] == "uniform" and result["estimator"] == "cosine"
    own = json.loads(CliRunner().invoke(cli_main(), ["eval", str(run_dir), "--json"]).stdout)
    assert "overrides" not in own and own["nll_per_token"] != result["nll_per_token"]
    refused = CliRunner().invoke(cli_main(), ["eval", str(run_dir), "--set", "model.d_model=64"])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
