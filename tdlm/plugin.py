"""The front door of tdlm's plugin API: everything a plugin, and a plugin's tests, may import.

    from tdlm.plugin import ComponentConfig, Corruption, hookimpl

Import from here, never from the module a name happens to live in: those may move (they have,
see docs/plugins.md#upgrading-a-plugin), this module's names stay, and `__all__` lists them. tdlm's
own components (tdlm.builtins) import from here too, so they use nothing a plugin cannot.

Nothing heavy is imported with this module (`tdlm --help` must stay fast): each name is imported
from its home the first time it is used. The test helpers at the end (`load_run` and the like)
belong to higher layers; a component must not call them (a sampler gets other runs through
`RunContext.load_draft`).
"""

from __future__ import annotations

import importlib

_HOME = {
    # the hook marker and the version of this API
    "hookimpl": "tdlm.hookspecs",
    "PLUGIN_API_VERSION": "tdlm",
    # the base classes, and what a component is told and returns
    "Schedule": "tdlm.components",
    "Corruption": "tdlm.components",
    "Objective": "tdlm.components",
    "Sampler": "tdlm.components",
    "ComponentConfig": "tdlm.components",
    "VocabInfo": "tdlm.components",
    "RunContext": "tdlm.components",
    "SequenceScores": "tdlm.components",
    "SampleOutput": "tdlm.components",
    "SampleStats": "tdlm.components",
    "Denoised": "tdlm.head",
    "Denoiser": "tdlm.components",
    # helpers every kind of component may use
    "stratified_times": "tdlm.components",
    "sample_categorical": "tdlm.components",
    "implements": "tdlm.components",
    "build_component": "tdlm.components",
    "all_positions_scores": "tdlm.head",
    "last_position_logits": "tdlm.head",
    # what the built-in samplers share: time grids, the ancestral kernel, the AR distribution, drafts
    "time_grid": "tdlm.components.grids",
    "commit_count": "tdlm.components.grids",
    "ReverseKernel": "tdlm.components.kernel",
    "reverse_kernel": "tdlm.components.kernel",
    "denoiser_probs": "tdlm.components.kernel",
    "next_token_probs": "tdlm.components.next_token",
    "filter_probs": "tdlm.components.next_token",
    "Draft": "tdlm.components.draft",
    "DraftError": "tdlm.components.draft",
    "DraftMixin": "tdlm.components.draft",
    "check_draft": "tdlm.components.draft",
    # errors a user can fix: the command line prints their message, one line, no traceback
    "TdlmError": "tdlm.errors",
    "PluginError": "tdlm.errors",
    "ComponentRefused": "tdlm.errors",
    "RecipeError": "tdlm.config",
    # a component with an option naming another component (semi-ar's inner sampler)
    "validating_registry": "tdlm.registry",
    "UnknownComponentError": "tdlm.registry",
    "ResolvedComponent": "tdlm.registry",
    "format_validation_error": "tdlm.config",
    # for tests: a fresh registry, recipes, a built model, a trained run
    "get_plugin_manager": "tdlm.registry",
    "build_registry": "tdlm.registry",
    "plugin_api_problem": "tdlm.registry",
    "RunConfig": "tdlm.config",
    "read_recipe": "tdlm.config",
    "resolve_components": "tdlm.config",
    "build_model": "tdlm.lm",
    "load_run": "tdlm.rundir",
    "ModelConfig": "tdlm.model",
    "Transformer": "tdlm.model",
    # tdlm's own components, to build on or to test with
    "LinearSchedule": "tdlm.builtins.schedules",
    "CosineSchedule": "tdlm.builtins.schedules",
    "PolynomialSchedule": "tdlm.builtins.schedules",
    "LogLinearSchedule": "tdlm.builtins.schedules",
    "GeometricSchedule": "tdlm.builtins.schedules",
    "UniformMasking": "tdlm.builtins.corruptions.uniform",
    "StateDependentMasking": "tdlm.builtins.corruptions.state_dependent",
    "CARTMasking": "tdlm.builtins.corruptions.cart",
    "DiffusionObjective": "tdlm.builtins.objectives.diffusion",
    "AutoregressiveObjective": "tdlm.builtins.objectives.ar",
    "AncestralSampler": "tdlm.builtins.samplers.ancestral",
    "AutoregressiveSampler": "tdlm.builtins.samplers.autoregressive",
    "ConfidenceSampler": "tdlm.builtins.samplers.remasking",
    "ThresholdSampler": "tdlm.builtins.samplers.remasking",
    "SemiAutoregressiveSampler": "tdlm.builtins.samplers.semi_ar",
    "SpeculativeSampler": "tdlm.builtins.samplers.speculative",
    "ARSpeculativeSampler": "tdlm.builtins.samplers.ar_speculative",
}
"""Each name of the plugin API and the module it lives in (imported when the name is first used)."""

__all__ = list(_HOME)


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tdlm.plugin' has no attribute {name!r}; the plugin API is tdlm.plugin.__all__ "
                             "(docs/plugins.md#what-a-plugin-imports)")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next use is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
