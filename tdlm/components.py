"""What each kind of component receives and returns: the interface a plugin implements.

Every component class has a nested pydantic `Config` (the keys of its recipe section besides
`name`; unknown keys are rejected) and is built by tdlm as shown in each class's `__init__`.
Shapes: B sequences of N positions; V real tokens; the mask token is id V (`vocab.mask_id`),
one past the last real token. The denoiser `net(x) -> logits [B, N, V]` never scores the mask
token, so the SUBS rule "the mask id has probability 0" holds by construction. Training and
evaluation hand a corruption a `Denoised` (tdlm.head) instead of logits: the output head is
applied only at the masked positions, where the NELBO has terms.

Flow: data -> corruption (forward process, uses a schedule) -> model -> objective -> step ->
eval (objective.score) -> sample (sampler, uses the corruption's reverse kernel).

A component may say which methods it calls on the others (`needs_corruption`, ...): a recipe
whose parts do not fit is refused when it is resolved (`tdlm run --check`), not at the first
eval or sample. A method counts as provided when the class overrides the base's placeholder
(the ones marked `@required` below raise NotImplementedError); `implements(cls, name)` tells.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from tdlm.errors import TdlmError
from tdlm.head import Denoised

Denoiser = Callable[[Tensor], Denoised]  # x_t [B, N] -> the prediction mu(. | x_t), see Denoised


def required(method: Callable) -> Callable:
    """Marks a base-class method that only raises NotImplementedError: a subclass that does not
    override it lacks it (`implements`)."""
    method.__tdlm_required__ = True
    return method


def implements(cls: type, name: str) -> bool:
    """Whether component class `cls` provides method `name`: it has one, and it is not a base
    class's `@required` placeholder."""
    method = getattr(cls, name, None)
    return callable(method) and not getattr(method, "__tdlm_required__", False)


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


def build_component(cls: type, config: ComponentConfig, *, context: RunContext | None, **parts):
    """`cls(config, **parts, context=context)`, as tdlm builds every corruption, objective and
    sampler. A class whose own `__init__` takes no `context` (written before it existed) is built
    without it and gets `self.context` set right after, so it keeps working."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    takes = any(p.name == "context" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if isinstance(cls, type) and issubclass(cls, Sampler) and context is not None:
        check_steps(config, context.seq_len)  # before __init__: some precompute a table per step
    if takes:
        return cls(config, **parts, context=context)
    component = cls(config, **parts)
    component.context = context
    return component


class SamplerOptionError(TdlmError, ValueError):
    """A sampler option that cannot finish: more steps than any use for the canvas."""


STEPS_PER_POSITION = 1024
"""A sampler's step counts are bounded by the canvas: at most one step per position can change it
(each masked position is filled once), and a finer time grid than this many steps per position
only makes the loop longer (steps = 10**9 would run for days and its grid alone take 8 GB)."""


def check_steps(config, length: int) -> None:
    """SamplerOptionError when an option of `config` (a sampler's Config) named `steps` or
    `*_steps`, nested options included, is more than STEPS_PER_POSITION x `length` (the canvas
    length, or the sequence length it cannot exceed)."""
    limit = STEPS_PER_POSITION * max(length, 1)

    def walk(options: dict, prefix: str) -> None:
        for key, value in options.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif (key == "steps" or key.endswith("_steps")) and isinstance(value, int) and value > limit:
                raise SamplerOptionError(
                    f"sampler option {prefix}{key} = {value:,} is more than {STEPS_PER_POSITION:,} steps per position "
                    f"of a {length}-token canvas: at most {length} steps can change it and the rest would only make "
                    f"sampling run for hours; give {prefix}{key} <= {limit:,}")

    walk(config.model_dump(), "")


class Schedule:
    """alpha_t: the probability that a token is still clean at time t in [0, 1].

    Implement `alpha` and `alpha_prime` (elementwise on float tensors); `mask_rate` and
    `weight` follow. alpha_0 = 1, alpha_1 = 0 (or a tiny eps), monotone decreasing.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    @required
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @required
    def alpha_prime(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def mask_rate(self, t: Tensor) -> Tensor:
        """1 - alpha_t, the probability that a token is masked at t. Default: `1 - alpha(t)`, which
        is 0 wherever alpha_t rounds to 1 (t < 1e-16 for linear in float64); override it with a
        form without that cancellation (t for linear, sin^2(pi t / 2) for cosine)."""
        return 1.0 - self.alpha(t)

    def weight(self, t: Tensor) -> Tensor:
        """NELBO weight w(t) = -alpha'_t / (1 - alpha_t) (docs/maths.md section 1)."""
        return -self.alpha_prime(t) / self.mask_rate(t)


class Corruption(nn.Module):
    """The forward (noising) process and the per-position terms of its NELBO.

    A corruption owns both because the bound depends on the forward process. It is an
    nn.Module so that it may hold learnable parameters (they are trained with the model).
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    schedule_invariant: ClassVar[bool] = False
    """True when, for a denoiser that does not take t as input, this corruption's NELBO is the
    same under every schedule (uniform masking): the evaluation may then draw t under a
    schedule whose estimator has finite variance (docs/maths.md section 1.6)."""
    masks_independently: ClassVar[bool] = False
    """True when `corrupt` masks each position independently of the others (given its own token
    and t): holding some positions clean then leaves the forward process of the others as it
    was, and `nelbo_terms` summed over them bounds -log p(them | the clean ones), the bound a
    conditional score needs (docs/maths.md section 1.12). Not so for a fixed count of masks."""
    needs_schedule: ClassVar[tuple[str, ...]] = ()
    """Schedule methods this corruption calls (e.g. ("alpha", "alpha_prime")): checked when a
    recipe is resolved."""

    def __init__(self, config: ComponentConfig, *, schedule: Schedule, vocab: VocabInfo,
                 context: RunContext | None = None):
        super().__init__()
        self.config, self.schedule, self.vocab, self.context = config, schedule, vocab, context

    @classmethod
    def requirements(cls, config: ComponentConfig) -> dict[str, tuple[str, ...]]:
        """kind -> the methods this corruption, with these options, calls on that component."""
        return {"schedule": tuple(cls.needs_schedule)}

    def with_schedule(self, schedule: Schedule) -> "Corruption":
        """The same corruption under another schedule (for a schedule_invariant evaluation)."""
        return build_component(type(self), self.config, schedule=schedule, vocab=self.vocab, context=self.context)

    @required
    def corrupt(self, x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """x0 [B, N] long, t [B] -> x_t [B, N] with `vocab.mask_id` at masked positions."""
        raise NotImplementedError

    @required
    def nelbo_terms(self, denoised: Denoised, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-position integrand of the NELBO at time t: [B, N], zero where x_t is not masked.

        `denoised` is the denoiser's prediction at x_t: `denoised.cross_entropy(x0)` gives
        -log mu(x0_n | x_t) [B, N] (zero at unmasked positions), `denoised.masked_log_probs()`
        the whole log mu [M, V] at the M masked positions when a bound needs more than the
        cross-entropy, and `denoised.scatter(values [M])` puts per-masked-position values back
        into [B, N].

        For each sequence, E_t[terms.sum(-1)] with t ~ U[0, 1] is the NELBO in nats. This is what
        `tdlm eval` reports, so it must be a valid bound for this process.
        """
        raise NotImplementedError

    def training_terms(
        self, denoise: Denoiser, x0: Tensor, t: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """Per-position training loss [B, N] at time t. Default: the NELBO terms of one draw.

        Override to train with another weighting (not a bound) or with extra estimators
        (e.g. a second draw for a gradient of learnable schedule parameters).
        """
        xt = self.corrupt(x0, t, generator)
        return self.nelbo_terms(denoise(xt), x0, xt, t)

    @required
    def reverse_unmask_probs(self, probs: Tensor, xt: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """One reverse step t -> s < t at the masked positions of x_t.

        probs [B, N, V] is the denoiser's mu(. | x_t); t, s [B]. Returns [B, N, V]: the
        probability that the position becomes token v at time s; the rest of the mass
        (1 - sum over v) is the probability that it stays masked.
        """
        raise NotImplementedError


@dataclass
class SequenceScores:
    """What an objective's `score` returns for a batch of clean sequences."""

    nll: Tensor  # [B] float64: per-sequence NLL in nats (exact) or NELBO estimate (a bound)
    is_bound: bool
    nll_var: Tensor | None = None  # [B] variance of the mean over t samples (Monte Carlo), if any
    estimator: str | None = None  # how a bound was estimated (e.g. the schedule t was drawn under)
    extras: dict[str, Tensor] = field(default_factory=dict)  # summed counters, e.g. per-t-bucket loss


class Objective(nn.Module):
    """The training loss and the evaluation score. `causal` decides the model's attention."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    causal: ClassVar[bool] = False
    default_sampler: ClassVar[str] = "ancestral"
    needs_corruption: ClassVar[tuple[str, ...]] = ()
    """Corruption methods this objective calls (e.g. ("corrupt", "nelbo_terms")): checked when a
    recipe is resolved, so a corruption that lacks one is refused before training starts."""

    def __init__(self, config: ComponentConfig, *, corruption: Corruption, vocab: VocabInfo,
                 context: RunContext | None = None):
        super().__init__()
        self.config, self.corruption, self.vocab = config, corruption, vocab
        self.context = context if context is not None else getattr(corruption, "context", None)

    @classmethod
    def requirements(cls, config: ComponentConfig) -> dict[str, tuple[str, ...]]:
        """kind -> the methods this objective, with these options, calls on that component."""
        return {"corruption": tuple(cls.needs_corruption)}

    @required
    def loss(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss (nats per real token) and detached tensors worth logging."""
        raise NotImplementedError

    @required
    @torch.no_grad()
    def score(
        self, net: nn.Module, x0: Tensor, *, generator: torch.Generator, t_samples: int
    ) -> SequenceScores:
        """Score every token of every sequence of x0 [B, N] (evaluation)."""
        raise NotImplementedError


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L] long, no mask ids left
    nfe: int  # number of denoiser calls (network function evaluations)
    stats: dict[str, Any] = field(default_factory=dict)
    """Optional sampler-specific counters, e.g. the speculative samplers' draft calls and
    acceptance rate (`nfe` stays the number of sequential calls of the net being sampled)."""


class Sampler:
    """Generates tokens into the masked positions of a canvas.

    `canvas` [B, L] holds prompt / template tokens, and `vocab.mask_id` where tokens are to be
    generated. Tokens that are not masked in the canvas must come back unchanged.
    `positions` (bool [B, L], optional) limits which masked positions may be committed in this
    call; the others stay masked but are still seen by the network (semi-autoregressive blocks).
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    trace: list[Tensor] | None = None
    """Set to a list by `tdlm sample --trace`: `record` appends the canvas after each step."""
    needs_corruption: ClassVar[tuple[str, ...]] = ()
    """Corruption methods this sampler calls (e.g. ("reverse_unmask_probs",)): checked when a
    recipe is resolved (`tdlm run --check`), so a corruption that lacks one is refused at once."""
    needs_objective: ClassVar[tuple[str, ...]] = ()
    """Objective methods this sampler calls, checked likewise."""

    def __init__(self, config: ComponentConfig, *, objective: Objective, vocab: VocabInfo,
                 context: RunContext | None = None):
        self.config, self.objective, self.vocab = config, objective, vocab
        self.context = context if context is not None else getattr(objective, "context", None)

    @classmethod
    def requirements(cls, config: ComponentConfig) -> dict[str, tuple[str, ...]]:
        """kind -> the methods this sampler, with these options, calls on that component. Default:
        the class attributes; override where they depend on the options (a sampler that runs
        another sampler needs what that one needs)."""
        return {"corruption": tuple(cls.needs_corruption), "objective": tuple(cls.needs_objective)}

    def record(self, x: Tensor) -> None:
        """Call after each step with the whole canvas [B, L]: a trace picture shows the steps.
        (A sampler that never calls it is traced by its first and last canvas only.)"""
        if self.trace is not None:
            self.trace.append(x.detach().cpu().clone())

    @required
    @torch.no_grad()
    def sample(
        self, net: nn.Module, canvas: Tensor, generator: torch.Generator, *, positions: Tensor | None = None
    ) -> SampleOutput:
        raise NotImplementedError


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
