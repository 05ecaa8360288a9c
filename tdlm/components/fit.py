"""Whether a class registered as a component fits this tdlm's plugin API: what the registry checks
of it when a plugin registers it (tdlm.registry.Registry.add), so that a plugin written for an
older API is refused with one line when tdlm loads it (`tdlm run --check` included), never with a
traceback at the first training step.

Three things are checked against the kind's base class: the class subclasses it; every attribute
the base declares (`causal`, `needs_corruption`, ...) has the declared type, and the capabilities
that promise an option or an argument keep the promise; and every base-class method the class
overrides takes what tdlm passes (as many positional parameters, which tdlm passes by position,
every keyword argument by its name, defaults where tdlm may leave an argument out). A method that
cannot be inspected (a C function, a partialmethod) is taken on trust. Each problem is one line naming what changed and where
docs/plugins.md says how to update.
"""

from __future__ import annotations

import inspect

from tdlm.components.corruption import Corruption
from tdlm.components.objective import Objective
from tdlm.components.sampler import Sampler
from tdlm.components.schedule import Schedule

BASES = {"schedule": Schedule, "corruption": Corruption, "objective": Objective, "sampler": Sampler}
UPGRADING = "see docs/plugins.md#upgrading-a-plugin"

DECLARED = {
    Schedule: {},
    Corruption: {"schedule_invariant": bool, "masks_independently": bool, "needs_schedule": tuple},
    Objective: {"causal": bool, "default_sampler": str, "needs_corruption": tuple, "score_takes_maskable": bool,
                "supports_eval_schedule": bool},
    Sampler: {"causal": bool, "supports_stop_at_eos": bool, "needs_corruption": tuple, "needs_objective": tuple},
}
"""The class attributes each base class declares, and their types (a tuple: of method names)."""

EXAMPLE_NEEDS = {"needs_schedule": ("alpha", "alpha_prime"), "needs_corruption": ("reverse_unmask_probs",),
                 "needs_objective": ("score",)}

OPTION_OF_CAPABILITY = {"supports_stop_at_eos": "stop_at_eos", "supports_eval_schedule": "eval_schedule"}
"""A capability that promises an option of the component's Config, and the option's name."""


def fit_problem(kind: str, cls: type) -> str | None:
    """Why `cls`, registered as a component of `kind`, does not fit this tdlm's plugin API (one
    line, ending with where the docs say how to update), or None when it fits."""
    base = BASES[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return (f"it is not a subclass of {base.__name__}: every {kind} subclasses tdlm.plugin.{base.__name__} "
                f"(its constructor, defaults and declared attributes come with it); {UPGRADING}")
    problems = attribute_problems(base, cls) + signature_problems(base, cls)
    return f"{problems[0]}; {UPGRADING}" if problems else None


def attribute_problems(base: type, cls: type) -> list[str]:
    """The declared attributes of `cls` that do not have their declared type, or whose promise (an
    option, an argument) the class does not keep."""
    problems = []
    for name, expected in DECLARED[base].items():
        value = getattr(cls, name, None)
        if expected is tuple:
            if isinstance(value, str) or not (isinstance(value, (tuple, list))
                                              and all(isinstance(item, str) for item in value)):
                problems.append(f"{name} = {value!r} is not a tuple of method names ({base.__name__}.{name}: "
                                f"tuple[str, ...], e.g. {name} = {EXAMPLE_NEEDS.get(name, ())!r})")
        elif not isinstance(value, expected):
            problems.append(f"{name} = {value!r} is not a {expected.__name__} ({base.__name__}.{name}: "
                            f"{expected.__name__})")
        elif name in OPTION_OF_CAPABILITY and value and OPTION_OF_CAPABILITY[name] not in cls.Config.model_fields:
            problems.append(f"it declares {name} = True, which promises an option "
                            f"{OPTION_OF_CAPABILITY[name]!r} in its Config, and its Config has none")
    if base is Objective and cls.score_takes_maskable and not _takes(cls.score, "maskable"):
        problems.append(f"it declares score_takes_maskable = True and its score{_shown(cls.score)} takes no "
                        "`maskable`")
    return problems


def signature_problems(base: type, cls: type) -> list[str]:
    """Each base-class method `cls` overrides whose signature does not take what tdlm passes."""
    problems = []
    for name, declared in vars(base).items():
        if name.startswith("_") or not inspect.isfunction(_function(declared)):
            continue
        owner = next(klass for klass in cls.__mro__ if name in vars(klass))
        if owner is base or owner in base.__mro__:
            continue  # not overridden
        override = vars(owner)[name]
        if isinstance(declared, classmethod) != isinstance(override, classmethod):
            kind = "a classmethod" if isinstance(declared, classmethod) else "a plain method"
            problems.append(f"{owner.__qualname__}.{name} must be {kind}, as {base.__name__}.{name} is")
            continue
        if not (callable(_function(override)) or hasattr(override, "__get__")):  # partialmethod: a descriptor
            problems.append(f"{owner.__qualname__}.{name} = {override!r} is not a method, as "
                            f"{base.__name__}.{name} is")
            continue
        problem = _signature_problem(base, name, _function(declared), _function(override),
                                     static=isinstance(override, staticmethod))
        if problem:
            problems.append(f"{owner.__qualname__}.{problem}")
    return problems


OLD_NELBO_TERMS = ("{name}{got} takes logits, and nelbo_terms receives a Denoised since plugin API 1.0 (the "
                   "denoiser's prediction at x_t): name the argument `denoised` and use denoised.cross_entropy(x0, "
                   "weight) for the weighted cross-entropy at the masked positions (Denoised.from_logits(logits, "
                   "xt, mask_id) wraps logits in a test)")


def _signature_problem(base: type, name: str, declared, override, *, static: bool = False) -> str | None:
    try:
        expected = list(inspect.signature(declared).parameters.values())[1:]  # without self / cls
        got = list(inspect.signature(override).parameters.values())
    except (TypeError, ValueError):  # not inspectable: taken on trust, as before signatures were checked
        return None
    wanted = f"{base.__name__}.{name}{_shown(declared)}"
    shown = f"{name}{_shown(override)}"
    kinds = {p.kind for p in got}
    if inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds:
        return None  # takes anything (a wrapper written without functools.wraps, too)
    if not static and got and got[0].kind in (got[0].POSITIONAL_ONLY, got[0].POSITIONAL_OR_KEYWORD):
        got = got[1:]  # self / cls
    if name == "nelbo_terms" and got and got[0].name == "logits":
        return OLD_NELBO_TERMS.format(name=name, got=_shown(override))
    positional = [p for p in got if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in got}
    passed = [p for p in expected if p.kind is p.POSITIONAL_OR_KEYWORD]  # tdlm passes these by position
    if len(positional) < len(passed) and inspect.Parameter.VAR_POSITIONAL not in kinds:
        return f"{shown} lacks the parameter {passed[len(positional)].name!r} that tdlm passes ({wanted})"
    for want in (p for p in expected if p.kind is p.KEYWORD_ONLY):
        have = by_name.get(want.name)
        if have is None or have.kind is have.POSITIONAL_ONLY:
            if inspect.Parameter.VAR_KEYWORD in kinds:
                continue
            return f"{shown} lacks the keyword argument {want.name!r} that tdlm passes ({wanted})"
        if want.default is not want.empty and have.default is have.empty:
            return f"{shown}: {want.name!r} needs a default, as in {wanted}: tdlm may leave it out"
    keywords = {p.name for p in expected if p.kind is p.KEYWORD_ONLY}
    for extra in positional[len(passed):] + [p for p in got if p.kind is p.KEYWORD_ONLY]:
        if extra.name not in keywords and extra.default is extra.empty:
            return f"{shown}: tdlm does not pass {extra.name!r}, so it needs a default ({wanted})"
    return None


def _function(member):
    """The plain function behind a method, classmethod or staticmethod."""
    return getattr(member, "__func__", member)


def _takes(method, name: str) -> bool:
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def _shown(function) -> str:
    """A signature as the user wrote it, without annotations: (self, logits, x0, xt, t)."""
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in inspect.signature(function).parameters.values()]
    return str(inspect.Signature(parameters))
