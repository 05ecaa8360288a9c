"""The plugin system: the registry, its errors, `tdlm plugins`, and a third-party package end to end.

Fake plugins are modules registered on a fresh manager (`get_plugin_manager(entry_points=False)`),
so nothing leaks between tests. The end-to-end tests pip-install the example package
examples/tdlm-fixed-count (and a broken one) into a temporary folder, offline, and put
that folder on sys.path, or on PYTHONPATH of a `python -m tdlm` subprocess (a fresh interpreter).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from toydata import toy_recipe, write_toy_corpus

from tdlm import hookimpl
from tdlm.cli import cli
from tdlm.components import ComponentConfig, Objective, SequenceScores, VocabInfo
from tdlm.config import RecipeError, read_recipe, resolve_components
from tdlm.evaluate import evaluate, format_result
from tdlm.lm import LanguageModel
from tdlm.model import ModelConfig, Transformer
from tdlm.registry import PluginError, build_registry, get_plugin_manager
from tdlm.builtins.objectives.diffusion import DiffusionObjective
from tdlm.builtins.schedules import CosineSchedule, LinearSchedule
from tdlm.builtins.corruptions.uniform import UniformMasking

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tdlm-fixed-count"


BUILTINS = {
    ("schedule", "linear"): "tdlm.builtins.schedules",
    ("schedule", "cosine"): "tdlm.builtins.schedules",
    ("schedule", "polynomial"): "tdlm.builtins.schedules",
    ("schedule", "loglinear"): "tdlm.builtins.schedules",
    ("schedule", "geometric"): "tdlm.builtins.schedules",
    ("corruption", "uniform"): "tdlm.builtins.corruptions.uniform",
    ("corruption", "state-dependent"): "tdlm.builtins.corruptions.state_dependent",
    ("corruption", "cart"): "tdlm.builtins.corruptions.cart",
    ("objective", "diffusion"): "tdlm.builtins.objectives.diffusion",
    ("objective", "ar"): "tdlm.builtins.objectives.ar",
    ("sampler", "ancestral"): "tdlm.builtins.samplers.ancestral",
    ("sampler", "ar"): "tdlm.builtins.samplers.autoregressive",
    ("sampler", "confidence"): "tdlm.builtins.samplers.remasking",
    ("sampler", "threshold"): "tdlm.builtins.samplers.remasking",
    ("sampler", "semi-ar"): "tdlm.builtins.samplers.semi_ar",
    ("sampler", "speculative"): "tdlm.builtins.samplers.speculative",
    ("sampler", "ar-speculative"): "tdlm.builtins.samplers.ar_speculative",
}


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A module object holding the given hook functions, as a plugin package would."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, function)
    return module


@pytest.fixture
def fixed_count(monkeypatch):
    """The example plugin's module, imported from its source folder (no install needed)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import tdlm_fixed_count

    return tdlm_fixed_count


# -- the registry ----------------------------------------------------------------------------


def test_registry_lists_every_builtin_with_its_plugin_and_package():
    registry = build_registry(get_plugin_manager(entry_points=False))
    found = {(c.kind, c.name): c for c in registry.all()}
    assert set(found) == set(BUILTINS)
    for key, plugin in BUILTINS.items():
        assert found[key].plugin == plugin
        assert found[key].package == "tdlm"
        assert issubclass(found[key].config_cls, ComponentConfig)
    assert registry.failed == {}


def test_duplicate_component_name_is_an_error_naming_both_plugins():
    @hookimpl
    def register_corruptions(register):
        class OtherUniform(UniformMasking):
            pass

        register("uniform", OtherUniform)

    pm = get_plugin_manager(entry_points=False)
    pm.register(plugin_module("fake_uniform", register_corruptions=register_corruptions), name="fake-uniform")
    with pytest.raises(PluginError, match="registered twice") as info:
        build_registry(pm)
    assert "'tdlm.builtins.corruptions.uniform'" in str(info.value) and "'fake-uniform'" in str(info.value)


def test_component_without_a_config_class_is_a_clear_error():
    class NoConfig:  # not derived from tdlm.components.Corruption, so it has no Config
        pass

    @hookimpl
    def register_corruptions(register):
        register("no-config", NoConfig)

    pm = get_plugin_manager(entry_points=False)
    pm.register(plugin_module("fake_no_config", register_corruptions=register_corruptions), name="fake-no-config")
    with pytest.raises(PluginError, match=r"'no-config' from plugin 'fake-no-config' has no nested pydantic `Config`"):
        build_registry(pm)


def test_a_package_with_a_misspelt_hook_is_skipped_with_a_warning(monkeypatch):
    """`register_corruption` (singular) would otherwise be silently never called; the package is
    skipped with a warning naming the hook, and every other command still works."""
    import importlib.metadata

    @hookimpl
    def register_corruption(register):
        register("never", UniformMasking)

    module = plugin_module("fake_misspelt", register_corruption=register_corruption)
    monkeypatch.setitem(sys.modules, "fake_misspelt", module)
    entry_point = importlib.metadata.EntryPoint("misspelt", "fake_misspelt", "tdlm")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [entry_point] if group == "tdlm" else [])
    with pytest.warns(UserWarning, match="'misspelt'.*was skipped: it implements register_corruption,") as caught:
        registry = build_registry(get_plugin_manager())
    assert "register_corruptions" in str(caught[0].message)  # the message lists the hooks that exist
    assert "register_corruption," in registry.failed["misspelt"]
    assert "never" not in registry.names("corruption") and "uniform" in registry.names("corruption")


def test_unknown_component_in_a_recipe_suggests_the_closest(tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('[corruption]\nname = "unifrom"\n')
    cfg = read_recipe(recipe)
    with pytest.raises(RecipeError, match=r"corruption\.name: unknown corruption 'unifrom'.*did you mean 'uniform'"):
        resolve_components(cfg, build_registry(get_plugin_manager(entry_points=False)))


def test_plugins_command_json():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert set(listing) == {"components", "failed"}
    rows = {(row["kind"], row["name"]): row for row in listing["components"]}
    assert set(BUILTINS) <= set(rows)
    for key, plugin in BUILTINS.items():
        row = rows[key]
        assert set(row) == {"kind", "name", "plugin", "package", "version", "options"}
        assert (row["plugin"], row["package"]) == (plugin, "tdlm")
    assert rows[("objective", "diffusion")]["options"] == ["eval_schedule", "stratified", "t_eps"]


# -- the fixed-count example corruption --------------------------------------------------------

V, N = 40, 16
VOCAB = VocabInfo(size=V, mask_id=V, bos_id=0)


def diffusion_objective(corruption_cls, schedule_cls=LinearSchedule):
    corruption = corruption_cls(corruption_cls.Config(), schedule=schedule_cls(schedule_cls.Config()), vocab=VOCAB)
    return DiffusionObjective(DiffusionObjective.Config(), corruption=corruption, vocab=VOCAB)


def test_fixed_count_masks_exactly_ceil_t_n_positions(fixed_count):
    corruption = diffusion_objective(fixed_count.FixedCountMasking).corruption
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (64, N), generator=generator)
    t = torch.cat([torch.tensor([0.0, 1e-9, 1.0 / N, 0.5, 1.0 - 1e-6, 1.0]), torch.rand(58, generator=generator)])
    xt = corruption.corrupt(x0, t, generator)
    expected = torch.ceil(t.double() * N).long().clamp(1, N)
    masked = xt == VOCAB.mask_id
    assert torch.equal(masked.sum(-1), expected)
    assert torch.equal(xt[~masked], x0[~masked])


def test_fixed_count_with_uniform_t_masks_a_uniform_number_of_random_positions(fixed_count):
    corruption = diffusion_objective(fixed_count.FixedCountMasking).corruption
    generator = torch.Generator().manual_seed(1)
    draws, length = 40_000, 8
    x0 = torch.zeros(draws, length, dtype=torch.long)
    masked = corruption.corrupt(x0, torch.rand(draws, generator=generator), generator) == VOCAB.mask_id
    frequency = torch.bincount(masked.sum(-1), minlength=length + 1).double() / draws
    sd = math.sqrt((1 / length) * (1 - 1 / length) / draws)
    assert frequency[0] == 0
    assert torch.allclose(frequency[1:], torch.full((length,), 1 / length, dtype=torch.float64), atol=5 * sd)
    assert masked.sum(-1).double().mean().item() == pytest.approx((length + 1) / 2, abs=0.05)
    # and no position is favoured: each is masked with probability E[l] / N = (N + 1) / (2N)
    per_position = masked.double().mean(0)
    expected = torch.full((length,), (length + 1) / (2 * length), dtype=torch.float64)
    assert torch.allclose(per_position, expected, atol=0.015)


def random_net() -> Transformer:
    """A fixed random Transformer with large weights, so predictions depend on what is masked."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=2), vocab_size=V, max_len=N, causal=False)
    with torch.no_grad():
        net.tok_emb.weight.normal_(std=1.0)
        net.head.weight.normal_(std=0.3)
    return net.eval()


def test_fixed_count_nelbo_agrees_with_uniform_masking(fixed_count):
    """Same expectation for a time-agnostic denoiser (docs/maths.md section 1), against both schedules."""
    net, batch, t_samples = random_net(), 64, 48
    x0 = torch.randint(0, V, (batch, N), generator=torch.Generator().manual_seed(2))

    def estimate(objective, seed):
        scores = objective.score(net, x0, generator=torch.Generator().manual_seed(seed), t_samples=t_samples)
        return scores.nll.mean().item(), scores.nll_var.sum().sqrt().item() / batch

    fixed, fixed_se = estimate(diffusion_objective(fixed_count.FixedCountMasking), 3)
    assert abs(fixed - N * math.log(V)) > 10 * fixed_se  # the net is far from uniform: a real test
    for schedule, seed in ((LinearSchedule, 4), (CosineSchedule, 5)):
        uniform, uniform_se = estimate(diffusion_objective(UniformMasking, schedule), seed)
        assert abs(fixed - uniform) < 4 * math.hypot(fixed_se, uniform_se), (schedule.__name__, fixed, uniform)
    assert fixed_se < uniform_se  # the point of the estimator: lower variance


def test_fixed_count_nelbo_of_uniform_predictions_is_ln_v(fixed_count):
    """With zero logits every draw is exactly (N / l) * l * ln V = N ln V: no Monte Carlo error."""
    objective = diffusion_objective(fixed_count.FixedCountMasking)
    x0 = torch.randint(0, V, (8, N), generator=torch.Generator().manual_seed(6))
    zero_logits = lambda x: torch.zeros(*x.shape, V)  # noqa: E731
    scores = objective.score(zero_logits, x0, generator=torch.Generator().manual_seed(7), t_samples=4)
    assert scores.is_bound
    assert torch.allclose(scores.nll / N, torch.full((8,), math.log(V), dtype=torch.float64), rtol=1e-6)


def test_fixed_count_reverse_step_is_the_linear_schedules(fixed_count):
    # the schedule is ignored: the reverse step is the linear schedule's, (t - s) / t
    corruption = diffusion_objective(fixed_count.FixedCountMasking, CosineSchedule).corruption
    probs = torch.softmax(torch.randn(2, N, V, generator=torch.Generator().manual_seed(8)), -1)
    t, s = torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.0])
    unmask = corruption.reverse_unmask_probs(probs, torch.full((2, N), V), t, s)
    assert torch.allclose(unmask.sum(-1), torch.tensor([[0.25], [1.0]]).expand(2, N))


def test_fixed_count_example_recipe_resolves(fixed_count):
    pm = get_plugin_manager(entry_points=False)
    pm.register(fixed_count, name="fixed-count")
    cfg = read_recipe(EXAMPLE / "recipe.toml")
    components = resolve_components(cfg, build_registry(pm))
    assert components["corruption"].component.cls is fixed_count.FixedCountMasking
    assert components["corruption"].component.plugin == "fixed-count"


def test_objective_without_bucket_extras_is_evaluated_and_reported():
    """A third-party objective need not return the diffusion objective's per-t counters."""

    class ConstantObjective(Objective):
        def loss(self, net, x0, generator):
            return net(x0).mean(), {}

        @torch.no_grad()
        def score(self, net, x0, *, generator, t_samples):
            nll = torch.full((len(x0),), x0.shape[1] * math.log(V), dtype=torch.float64)
            return SequenceScores(nll=nll, is_bound=True, nll_var=torch.zeros_like(nll))

    corruption = diffusion_objective(UniformMasking).corruption
    objective = ConstantObjective(ConstantObjective.Config(), corruption=corruption, vocab=VOCAB)
    sequences = torch.randint(0, V, (5, N), generator=torch.Generator().manual_seed(9))
    result = evaluate(LanguageModel(random_net(), objective), sequences, num_bytes=lambda tokens: tokens.numel(),
                      t_samples=2)
    assert result["nll_per_token"] == pytest.approx(math.log(V))
    assert "Monte Carlo stderr" in format_result(result)


# -- installed packages, end to end ------------------------------------------------------------


def pip_install(source: Path, target: Path) -> None:
    """Install a plugin package offline: no index, no build isolation (the venv's setuptools)."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.fail("building the example plugin offline needs setuptools in this environment: pip install setuptools")
    build_copy = target.parent / f"{source.name}-src"  # pip builds in the source tree: keep the checkout clean
    shutil.copytree(source, build_copy)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(build_copy)],
        check=True, capture_output=True, text=True,
    )


def tdlm(args: list[str], *, pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")]),
               TDLM_CACHE_DIR=str(cwd / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "tdlm", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def installed_fixed_count(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("fixed-count") / "site"
    pip_install(EXAMPLE, target)
    return target


def test_installed_plugin_is_listed(installed_fixed_count, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_fixed_count))  # seen in-process; the next test runs it in a fresh one
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    rows = {(row["kind"], row["name"]): row for row in listing["components"]}
    row = rows[("corruption", "fixed-count")]
    assert (row["plugin"], row["package"], row["version"]) == ("fixed-count", "tdlm-fixed-count", "0.1.0")
    assert row["options"] == []
    assert listing["failed"] == {}


def test_installed_plugin_trains_from_a_recipe(installed_fixed_count, tmp_path):
    corpus = write_toy_corpus(tmp_path / "corpus")
    extra = '[corruption]\nname = "fixed-count"\n\n[sampler]\nname = "ancestral"\nsteps = 8\n'
    recipe = toy_recipe(tmp_path / "fixed.toml", corpus, tmp_path / "runs", extra=extra)
    result = tdlm(["run", str(recipe), "--set", "training.max_steps=4", "--set", "logging.tensorboard=false"],
                  pythonpath=installed_fixed_count, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "fixed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4
    assert math.isfinite(summary["valid"]["nll_per_token"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["corruption"] == {"name": "fixed-count"}


def test_broken_plugin_is_skipped_with_a_warning(tmp_path, monkeypatch):
    source = tmp_path / "tdlm-broken"
    (source / "tdlm_broken").mkdir(parents=True)
    (source / "tdlm_broken" / "__init__.py").write_text("import a_module_that_does_not_exist\n")
    (source / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "tdlm-broken"
        version = "0.1.0"

        [project.entry-points.tdlm]
        broken = "tdlm_broken"

        [tool.setuptools]
        packages = ["tdlm_broken"]
    """))
    target = tmp_path / "site"
    pip_install(source, target)

    result = tdlm(["plugins"], pythonpath=target, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tdlm plugin 'broken' (package tdlm-broken) failed to load" in result.stderr
    assert "ModuleNotFoundError" in result.stderr and "pip uninstall tdlm-broken" in result.stderr
    assert "uniform" in result.stdout  # the built-ins are still there
    assert "failed to load: broken: ModuleNotFoundError" in result.stdout

    monkeypatch.syspath_prepend(str(target))  # the same package, seen in-process: the JSON listing
    with pytest.warns(UserWarning, match=r"pip uninstall tdlm-broken"):
        result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    failed = json.loads(result.stdout)["failed"]
    assert list(failed) == ["broken"] and "a_module_that_does_not_exist" in failed["broken"]


@pytest.mark.parametrize("source, said", [
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ("raise KeyError('at import')\n", "KeyError"),
])
def test_a_plugin_that_exits_at_import_is_skipped_not_obeyed(tmp_path, monkeypatch, source, said):
    """One broken package never takes tdlm down: not even by sys.exit while it is imported."""
    import importlib.metadata

    (tmp_path / "tdlm_exits_at_import.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tdlm_exits_at_import", raising=False)
    entry_point = importlib.metadata.EntryPoint("exits", "tdlm_exits_at_import", "tdlm")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [entry_point] if group == "tdlm" else [])
    with pytest.warns(UserWarning, match=f"'exits'.*failed to load and was skipped: {said}"):
        result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert said in listing["failed"]["exits"] and listing["components"]


def test_a_plugin_that_prints_at_import_or_registration_leaves_json_output_whole(tmp_path, monkeypatch):
    import importlib.metadata

    (tmp_path / "tdlm_chatty.py").write_text(
        "print('hello from a plugin')\n"
        "from tdlm import hookimpl\n"
        "@hookimpl\n"
        "def register_samplers(register):\n"
        "    print('registering')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tdlm_chatty", raising=False)
    entry_point = importlib.metadata.EntryPoint("chatty", "tdlm_chatty", "tdlm")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [entry_point] if group == "tdlm" else [])
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["failed"] == {}
    assert "hello from a plugin" in result.stderr and "registering" in result.stderr
