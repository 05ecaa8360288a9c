"""What every kind of component shares: its Config base, what it is told about the vocabulary and
the model (VocabInfo, RunContext), the placeholder marker behind `implements`, and the two draws
every component makes the same way (float64 categorical, stratified t)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor


def placeholder(method: Callable) -> Callable:
    """Marks a base-class method that only raises NotImplementedError: a method a partner
    component may call (declared in its `needs_*`), which a subclass provides by overriding it.
    A subclass that does not override it lacks it (`implements`), and a recipe pairing it with a
    partner that needs it is refused when it is resolved."""
    method.__tdlm_placeholder__ = True
    return method


required = placeholder
"""The old name of `placeholder` (before plugin API 1.2), kept for code that imported it."""


def implements(cls: type, name: str) -> bool:
    """Whether component class `cls` provides method `name`: it has one, and it is not a base
    class's `@placeholder`."""
    method = getattr(cls, name, None)
    return callable(method) and not getattr(method, "__tdlm_placeholder__", False)


class ComponentConfig(BaseModel):
    """Base for every component's Config: unknown keys are errors, and so are NaN and infinite
    floats (a temperature of inf or nan would sample noise, or nothing, without a word)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


@dataclass(frozen=True)
class VocabInfo:
    """What components need to know about the vocabulary (tdlm.data.Vocab provides these)."""

    size: int  # V, real tokens
    mask_id: int  # == size
    bos_id: int  # BOS / end-of-text id, a real token
    token_counts: Any = field(default=None, compare=False, repr=False)
    """np.ndarray [V]: how often each token occurs in the train split (None when unknown)."""


@dataclass(frozen=True)
class RunContext:
    """What tdlm tells a corruption, objective and sampler about the model it is built for
    (`self.context`; None when a component is built by hand without one).

    `seq_len` is the model's N, the longest sequence the network takes. The x0 or canvas a
    component is handed may be shorter: evaluation scores the last, partial sequence of a split
    (the tail) at its own length, and `tdlm sample --length/--template` asks for any length up
    to N. Work from `x0.shape[1]` for the sequence at hand; use `seq_len` for what must be fixed
    when the component is built (e.g. a buffer over every position)."""

    seq_len: int
    vocab: VocabInfo
    load_draft: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    """`load_draft(run_dir, which="best", device="cpu") -> tdlm.components.draft.Draft`: the network
    of another trained run, for a sampler that drafts with one (the speculative samplers' `draft`
    option). Whoever reads run directories sets it (tdlm.rundir.load_run and the trainer pass
    tdlm.rundir.load_draft), so that a component never imports the code that loads whole runs.
    None where no run directory can be read (a component built by hand): assign the draft network
    instead (`sampler.draft_net = net`)."""


def sample_categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one index per row of `probs` [..., K] (unnormalised is fine), in float64.

    Gumbel-max in low precision is biased (docs/maths.md section 5), so this works in float64.
    """
    p = probs.double()
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (p.log() + gumbel).argmax(-1)


def stratified_times(
    batch: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> Tensor:
    """t_i = (u + i / B) mod 1 with one u ~ U[0, 1): low-discrepancy times across a batch."""
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    return ((u + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0).float()


def construct(cls: type, config: ComponentConfig, *, context: RunContext | None, **parts):
    """`cls(config, **parts, context=context)`. A class whose own `__init__` takes no `context`
    (written before it existed) is built without it and gets `self.context` set right after, so
    it keeps working. `build_component` adds the checks made before a component is built."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    if any(p.name == "context" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return cls(config, **parts, context=context)
    component = cls(config, **parts)
    component.context = context
    return component
