"""The whole plugin surface of tdlm: one hook per kind of component.

A plugin module (built-in or third-party) implements any of these hooks and calls
`register(name, cls)` once per component it provides. `cls` must carry a nested pydantic
`Config` class; see tdlm/components/ (imported through tdlm.plugin) for what each kind of component
receives and returns.
"""

import pluggy

hookspec = pluggy.HookspecMarker("tdlm")
hookimpl = pluggy.HookimplMarker("tdlm")


@hookspec
def register_schedules(register):
    """Register noise schedules: `register("cosine", CosineSchedule)`."""


@hookspec
def register_corruptions(register):
    """Register corruption (forward) processes: `register("uniform", UniformMasking)`."""


@hookspec
def register_objectives(register):
    """Register training objectives: `register("diffusion", DiffusionObjective)`."""


@hookspec
def register_samplers(register):
    """Register samplers (reverse processes): `register("ancestral", AncestralSampler)`."""
