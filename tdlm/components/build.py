"""Building a component as tdlm does: `cls(config, **parts, context=context)`."""

from __future__ import annotations

from tdlm.components.common import ComponentConfig, RunContext, construct
from tdlm.components.sampler import Sampler, check_steps


def build_component(cls: type, config: ComponentConfig, *, context: RunContext | None, **parts):
    """`cls(config, **parts, context=context)`, as tdlm builds every corruption, objective and
    sampler. A class whose own `__init__` takes no `context` (written before it existed) is built
    without it and gets `self.context` set right after, so it keeps working. A sampler's step
    options are bounded by the canvas first."""
    if isinstance(cls, type) and issubclass(cls, Sampler) and context is not None:
        check_steps(config, context.seq_len)  # before __init__: some precompute a table per step
    return construct(cls, config, context=context, **parts)
