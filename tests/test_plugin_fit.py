"""A plugin written for an older plugin API is told what changed, in one line, when tdlm loads it and
at `tdlm run --check`, never with a traceback at the first training step (tdlm.components.fit,
tdlm.registry): the class must subclass its kind's base, its declared attributes must have their
types, and the methods it overrides must take what tdlm passes.

The old plugin is tests/old_plugin.py, registered in code (its author's tests) or installed as a
package with an entry point (a user's machine).
"""

from __future__ import annotations

import functools

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tdlm.plugin import (ComponentConfig, ComponentRefused, Corruption, Objective, PluginError, SampleOutput, Sampler,
                         TdlmError, UniformMasking, build_registry, get_plugin_manager, hookimpl)

HERE = Path(__file__).resolve().parent
UPGRADING = "; see docs/plugins.md#upgrading-a-plugin"
OLD_NELBO_TERMS = (
    "OldMasking.nelbo_terms(self, logits, x0, xt, t) takes logits, and nelbo_terms receives a Denoised since plugin "
    "API 1.0 (the denoiser's prediction at x_t): name the argument `denoised` and use denoised.cross_entropy(x0, "
    "weight) for the weighted cross-entropy at the masked positions (Denoised.from_logits(logits, xt, mask_id) "
    "wraps logits in a test)" + UPGRADING)


def registered(name: str, **components):
    """build_registry over the built-ins and a plugin module `name` registered in code, holding
    the given components, e.g. sampler=[("toy", ToySampler)]."""
    module = types.ModuleType(name)
    for kind, entries in components.items():
        @hookimpl(specname=f"register_{kind}s")
        def hook(register, _entries=entries):
            for component_name, cls in _entries:
                register(component_name, cls)

        setattr(module, f"register_{kind}s_impl", hook)
    pm = get_plugin_manager(entry_points=False)
    pm.register(module, name=name)
    return build_registry(pm)


def refusal(**components) -> str:
    with pytest.raises(ComponentRefused) as info:
        registered("toy-plugin", **components)
    return str(info.value)


# -- the old plugin: registered in code, its author's tests ---------------------------------------


def test_the_old_plugin_imports_tdlm_plugins_with_a_warning_naming_the_new_front_door(monkeypatch):
    monkeypatch.delitem(sys.modules, "tdlm.plugins", raising=False)
    monkeypatch.delitem(sys.modules, "old_plugin", raising=False)
    with pytest.warns(DeprecationWarning, match=r"tdlm.plugins was renamed tdlm.registry: import hookimpl, .* from "
                                                r"tdlm.plugin instead; see docs/plugins.md#upgrading-a-plugin"):
        old_plugin = importlib.import_module("old_plugin")
    import tdlm.plugins
    import tdlm.registry

    assert tdlm.plugins.get_plugin_manager is tdlm.registry.get_plugin_manager  # the old tests keep running
    assert tdlm.plugins.Denoised is importlib.import_module("tdlm.head").Denoised  # and the front door's names
    assert old_plugin.hookimpl is hookimpl


def test_the_old_nelbo_terms_is_refused_when_registered_in_one_line():
    import old_plugin

    pm = get_plugin_manager(entry_points=False)
    pm.register(old_plugin, name="old-plugin")
    with pytest.raises(ComponentRefused) as info:
        build_registry(pm)
    assert str(info.value) == ("corruption 'old-masking' (old_plugin.OldMasking, plugin 'old-plugin'): "
                               + OLD_NELBO_TERMS)
    assert isinstance(info.value, PluginError) and isinstance(info.value, TdlmError)  # one line, exit code 2


# -- the old plugin installed: skipped with a warning, its recipe refused at --check ---------------


def install_old_plugin(site: Path) -> None:
    """tests/old_plugin.py as the installed package tdlm-old-masking, entry point and all (a
    dist-info folder on sys.path is what pip would leave; no build needed)."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "tdlm_old_masking.py").write_text((HERE / "old_plugin.py").read_text())
    info = site / "tdlm_old_masking-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tdlm-old-masking\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tdlm]\nold-masking = tdlm_old_masking\n")


INSTALLED_REFUSAL = "corruption 'old-masking' (tdlm_old_masking.OldMasking, plugin 'old-masking'): " + OLD_NELBO_TERMS


@pytest.fixture
def installed_old_plugin(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    install_old_plugin(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "tdlm_old_masking", raising=False)
    recipe = tmp_path / "old.toml"
    recipe.write_text('[corruption]\nname = "old-masking"\n')
    return recipe


def test_an_installed_old_plugin_is_skipped_with_a_warning_and_listed_as_failed(installed_old_plugin):
    with pytest.warns(UserWarning, match="tdlm plugin 'old-masking' .package tdlm-old-masking. was skipped: ") as caught:
        registry = build_registry(get_plugin_manager())
    [warning] = [w for w in caught if issubclass(w.category, UserWarning)]
    assert str(warning.message) == (f"tdlm plugin 'old-masking' (package tdlm-old-masking) was skipped: "
                                    f"{INSTALLED_REFUSAL}. Update it for this tdlm, or uninstall it "
                                    "(`pip uninstall tdlm-old-masking`).")
    assert registry.failed["old-masking"] == INSTALLED_REFUSAL
    assert "old-masking" not in registry.names("corruption") and "uniform" in registry.names("corruption")


def test_tdlm_run_check_refuses_the_old_plugins_recipe_in_one_line(installed_old_plugin):
    from tdlm.cli import cli

    with pytest.warns(UserWarning, match="was skipped"):
        result = CliRunner().invoke(cli, ["run", str(installed_old_plugin), "--check"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == f"tdlm: error: corruption.name: {INSTALLED_REFUSAL}\n"


def test_tdlm_run_check_in_a_fresh_process_says_it_on_stderr_without_a_traceback(tmp_path):
    site = tmp_path / "site"
    install_old_plugin(site)
    recipe = tmp_path / "old.toml"
    recipe.write_text('[corruption]\nname = "old-masking"\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "tdlm", "run", str(recipe), "--check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"tdlm plugin 'old-masking' (package tdlm-old-masking) was skipped: {INSTALLED_REFUSAL}." in done.stderr
    assert done.stderr.splitlines()[-1] == f"tdlm: error: corruption.name: {INSTALLED_REFUSAL}"


# -- signatures ------------------------------------------------------------------------------------


class NoPositions(Sampler):
    """A sampler written before `positions` existed."""

    def sample(self, net, canvas, generator):
        return SampleOutput(tokens=canvas, nfe=0)


class RenamedArgument(Corruption):
    """tdlm passes corrupt's arguments by position: their names are the plugin's own."""

    def corrupt(self, x, t, generator):
        return x


def passing_through(method):
    """A decorator written without functools.wraps: its wrapper takes anything."""
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)
    return wrapper


class Wrapped(Sampler):
    needs_corruption = ["reverse_unmask_probs"]  # a list of method names reads as well as a tuple

    @passing_through
    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)

    @staticmethod
    def record(x):
        pass


class TooFewPositional(Corruption):
    def corrupt(self, x0, t):
        return x0


class NotAMethod(Sampler):
    sample = None


class PartialSample(Sampler):
    def _sample(self, net, canvas, generator, *, positions=None, scale=1.0):
        return SampleOutput(tokens=canvas, nfe=0)

    sample = functools.partialmethod(_sample, scale=2.0)


class ExtraRequired(Corruption):
    def corrupt(self, x0, t, generator, rate):
        return x0


class TakesAnything(Sampler):
    def sample(self, *args, **kwargs):
        return SampleOutput(tokens=args[1], nfe=0)


class PositionsWithoutDefault(Sampler):
    def sample(self, net, canvas, generator, *, positions):
        return SampleOutput(tokens=canvas, nfe=0)


class PlainRequirements(Sampler):
    def requirements(self, config):  # a classmethod on the base: tdlm calls it on the class
        return {}

    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)


def test_a_sampler_without_positions_is_refused_naming_the_signature_wanted():
    assert refusal(sampler=[("no-positions", NoPositions)]) == (
        f"sampler 'no-positions' ({__name__}.NoPositions, plugin 'toy-plugin'): NoPositions.sample(self, net, "
        "canvas, generator) lacks the keyword argument 'positions' that tdlm passes (Sampler.sample(self, net, "
        "canvas, generator, *, positions=None))" + UPGRADING)


@pytest.mark.parametrize("kind, cls, said", [
    ("corruption", TooFewPositional, "TooFewPositional.corrupt(self, x0, t) lacks the parameter 'generator' that "
                                     "tdlm passes (Corruption.corrupt(self, x0, t, generator))"),
    ("sampler", NotAMethod, "NotAMethod.sample = None is not a method, as Sampler.sample is"),
    ("corruption", ExtraRequired, "ExtraRequired.corrupt(self, x0, t, generator, rate): tdlm does not pass 'rate', "
                                  "so it needs a default"),
    ("sampler", PositionsWithoutDefault, "'positions' needs a default, as in Sampler.sample(self, net, canvas, "
                                         "generator, *, positions=None): tdlm may leave it out"),
    ("sampler", PlainRequirements, "PlainRequirements.requirements must be a classmethod, as Sampler.requirements is"),
])
def test_a_method_that_does_not_take_what_tdlm_passes_is_refused(kind, cls, said):
    message = refusal(**{kind: [("toy", cls)]})
    assert said in message and message.endswith(UPGRADING) and "\n" not in message


def test_signatures_that_take_what_tdlm_passes_are_accepted():
    registry = registered("fine-plugin", sampler=[("anything", TakesAnything), ("wrapped", Wrapped),
                                                  ("partial", PartialSample)],
                          corruption=[("renamed", RenamedArgument)])
    assert registry.get("sampler", "anything").cls is TakesAnything
    assert registry.get("sampler", "wrapped").cls is Wrapped  # a wrapper, a staticmethod, a list of needs
    assert registry.get("sampler", "partial").cls is PartialSample  # taken on trust
    assert registry.get("corruption", "renamed").cls is RenamedArgument
    # every built-in fits (they are registered in code, so a misfit would raise here)
    assert len(build_registry(get_plugin_manager(entry_points=False)).all()) == 17


# -- the base class and the declared attributes ----------------------------------------------------


class NotASampler:
    class Config(ComponentConfig):
        """No options."""

    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)


class NeedsAString(Sampler):
    needs_corruption = "reverse_unmask_probs"  # a string, not a tuple: it would be read letter by letter

    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)


class PromisesStopAtEos(Sampler):
    supports_stop_at_eos = True  # but no `stop_at_eos` option for --stop-at-eos to set

    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)


class PromisesMaskable(Objective):
    score_takes_maskable = True

    def loss(self, net, x0, generator):
        return net(x0).mean(), {}

    @torch.no_grad()
    def score(self, net, x0, *, generator, t_samples):
        raise NotImplementedError


class CausalAsText(Sampler):
    causal = "yes"

    def sample(self, net, canvas, generator, *, positions=None):
        return SampleOutput(tokens=canvas, nfe=0)


def test_a_class_that_is_not_a_subclass_of_its_base_is_refused():
    assert refusal(sampler=[("duck", NotASampler)]) == (
        f"sampler 'duck' ({__name__}.NotASampler, plugin 'toy-plugin'): it is not a subclass of Sampler: every "
        "sampler subclasses tdlm.plugin.Sampler (its constructor, defaults and declared attributes come with it)"
        + UPGRADING)


@pytest.mark.parametrize("kind, cls, said", [
    ("sampler", NeedsAString, "needs_corruption = 'reverse_unmask_probs' is not a tuple of method names"),
    ("sampler", CausalAsText, "causal = 'yes' is not a bool (Sampler.causal: bool)"),
    ("sampler", PromisesStopAtEos, "it declares supports_stop_at_eos = True, which promises an option 'stop_at_eos' "
                                   "in its Config, and its Config has none"),
    ("objective", PromisesMaskable, "it declares score_takes_maskable = True and its score(self, net, x0, *, "
                                    "generator, t_samples) takes no `maskable`"),
])
def test_a_declared_attribute_of_the_wrong_type_or_an_unkept_promise_is_refused(kind, cls, said):
    message = refusal(**{kind: [("toy", cls)]})
    assert said in message and message.endswith(UPGRADING)


def test_the_checked_attributes_are_every_class_attribute_a_base_declares():
    """A capability added to a base class is checked too (tdlm.components.fit.DECLARED)."""
    from tdlm.components.fit import BASES, DECLARED

    for base in BASES.values():
        declared = {name for name, annotation in base.__annotations__.items()
                    if "ClassVar" in str(annotation) and name != "Config"}
        assert declared == set(DECLARED[base]), base.__name__


def test_one_refused_component_skips_its_whole_installed_plugin(tmp_path, monkeypatch):
    """A plugin is loaded whole or not at all: its fitting components are not left half-registered,
    and a recipe naming one is told why it is missing."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tdlm_half_old.py").write_text(
        "from tdlm.plugin import UniformMasking, hookimpl\n"
        "from tdlm_half_old_sampler import NoPositions\n"
        "@hookimpl\n"
        "def register_corruptions(register):\n"
        "    register('fine-masking', UniformMasking)\n"
        "@hookimpl\n"
        "def register_samplers(register):\n"
        "    register('no-positions', NoPositions)\n")
    (site / "tdlm_half_old_sampler.py").write_text(
        "from tdlm.plugin import SampleOutput, Sampler\n"
        "class NoPositions(Sampler):\n"
        "    def sample(self, net, canvas, generator):\n"
        "        return SampleOutput(tokens=canvas, nfe=0)\n")
    info = site / "tdlm_half_old-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tdlm-half-old\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tdlm]\nhalf-old = tdlm_half_old\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(UserWarning, match="'half-old' .package tdlm-half-old. was skipped: sampler 'no-positions'"):
        registry = build_registry(get_plugin_manager())
    assert "fine-masking" not in registry.names("corruption")
    from tdlm.plugin import UnknownComponentError

    with pytest.raises(UnknownComponentError, match=r"corruption 'fine-masking' was not loaded: its plugin 'half-old' "
                                                    r"\(package tdlm-half-old\) was skipped because sampler "
                                                    r"'no-positions'"):
        registry.get("corruption", "fine-masking")
    assert registry.get("corruption", "uniform").cls is UniformMasking
