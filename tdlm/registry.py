"""Loading plugins and the typed registry of components they provide.

Built-in components live in `tdlm/builtins/` and are loaded from the
explicit list below; third-party packages are found through the `tdlm` entry-point group. Both
register through the same hooks (tdlm/hookspecs.py). The manager is built by a function, never
at import time, so every test and every command gets a fresh one.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pluggy

from tdlm import PLUGIN_API_VERSION, __version__, hookspecs
from tdlm.errors import ComponentRefused, PluginError

ENTRY_POINT_GROUP = "tdlm"
KINDS = ("schedule", "corruption", "objective", "sampler")
_HOOK_OF_KIND = {kind: f"register_{kind}s" for kind in KINDS}

BUILTIN_PLUGINS = (
    "tdlm.builtins.schedules",
    "tdlm.builtins.corruptions.uniform",
    "tdlm.builtins.corruptions.state_dependent",
    "tdlm.builtins.corruptions.cart",
    "tdlm.builtins.objectives.diffusion",
    "tdlm.builtins.objectives.ar",
    "tdlm.builtins.samplers.ancestral",
    "tdlm.builtins.samplers.autoregressive",
    "tdlm.builtins.samplers.remasking",
    "tdlm.builtins.samplers.semi_ar",
    "tdlm.builtins.samplers.speculative",
    "tdlm.builtins.samplers.ar_speculative",
)


class UnknownComponentError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    cls: type
    plugin: str  # the plugin module (or entry-point name) that registered it
    package: str  # the distribution it came from
    version: str

    @property
    def config_cls(self) -> type:
        return self.cls.Config

    def describe(self) -> str:
        """How messages name it: kind, name, class and the plugin that registered it."""
        where = f"{getattr(self.cls, '__module__', '?')}.{getattr(self.cls, '__qualname__', self.cls)}"
        return f"{self.kind} {self.name!r} ({where}, plugin {self.plugin!r})"


class ResolvedComponent(NamedTuple):
    """What a recipe section resolved to: the registered component and its validated options."""

    component: Component
    config: Any  # an instance of component.cls.Config


@dataclass
class Registry:
    """kind -> name -> Component, plus the plugins that failed to load (kept to explain errors)."""

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> error
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    """(kind, name) -> why a component an installed plugin registered was not loaded (it, or
    another of its plugin's, does not fit this tdlm's plugin API), in one line: a recipe naming
    it is told so."""

    def add(self, component: Component) -> None:
        """Register `component`; a PluginError when its name is taken or it has no Config, a
        ComponentRefused when its class does not fit this tdlm's plugin API (tdlm.components.fit)."""
        if component.kind not in KINDS:
            raise PluginError(f"unknown component kind {component.kind!r}")
        config_cls = getattr(component.cls, "Config", None)
        if config_cls is None or not hasattr(config_cls, "model_validate"):
            raise PluginError(
                f"{component.kind} {component.name!r} from plugin {component.plugin!r} has no "
                "nested pydantic `Config` class; every component must declare one (it may be empty)"
            )
        from tdlm.components.fit import fit_problem  # torch: imported once components are registered

        problem = fit_problem(component.kind, component.cls)
        if problem is not None:
            raise ComponentRefused(f"{component.describe()}: {problem}")
        existing = self.components[component.kind].get(component.name)
        if existing is not None:
            raise PluginError(
                f"{component.kind} {component.name!r} is registered twice: by plugin "
                f"{existing.plugin!r} ({existing.package}) and by plugin {component.plugin!r} "
                f"({component.package}); uninstall one of them or rename the component"
            )
        self.components[component.kind][component.name] = component

    def get(self, kind: str, name: str) -> Component:
        known = self.components[kind]
        if name in known:
            return known[name]
        if (kind, name) in self.refused:
            raise UnknownComponentError(self.refused[kind, name])
        message = f"unknown {kind} {name!r}; installed: {', '.join(sorted(known)) or 'none'}"
        close = difflib.get_close_matches(name, list(known), n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        if self.failed:
            message += "; plugins that failed to load: " + "; ".join(
                f"{plugin}: {error}" for plugin, error in self.failed.items()
            )
        raise UnknownComponentError(message)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def all(self) -> list[Component]:
        return [c for kind in KINDS for c in sorted(self.components[kind].values(), key=lambda c: c.name)]


def validating_registry(info) -> Registry:
    """The registry a component's Config is being validated against: the caller passes it as
    validation context, `Config.model_validate(options, context={"registry": registry})` (as
    tdlm.config.resolve_components does), so that an option naming another component (semi-ar's
    inner sampler) is looked up among the recipe's own plugins. `info` is pydantic's
    ValidationInfo. Validated without one (a Config built in code), it is the registry of the
    built-ins and the installed plugins."""
    registry = (info.context or {}).get("registry")
    return registry if registry is not None else build_registry()


def get_plugin_manager(*, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-ins and (unless disabled) the installed third-party plugins.

    A third-party plugin that fails to import, or that implements a hook tdlm does not know (a
    misspelt `register_corruption` would otherwise never be called), is reported with a warning
    and skipped, so one broken package never takes the toolkit down; `Registry.failed` keeps the
    error for later.
    """
    pm = pluggy.PluginManager("tdlm")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    pm.failed_plugins = {}
    if entry_points:
        with contextlib.redirect_stdout(sys.stderr):  # a plugin's print at import must not enter --json output
            _load_entry_points(pm)
    try:
        pm.check_pending()  # a misspelt hook function is an error, not silence
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (hooks tdlm knows: {', '.join(_HOOK_OF_KIND.values())})") from exc
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every installed third-party plugin that loads; warn about and skip the others."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None:
            dist = ep.dist.name if ep.dist else "?"
            pm.failed_plugins[f"{ep.name} ({dist})"] = f"entry-point name {ep.name!r} is taken by another plugin"
            warnings.warn(
                f"tdlm plugin {ep.name!r} of package {dist} was skipped: another plugin already uses "
                f"that entry-point name. Uninstall one of the two packages.",
                stacklevel=3,
            )
            continue
        dist = ep.dist.name if ep.dist else "?"
        try:
            module = ep.load()
            problem = plugin_api_problem(getattr(module, "TDLM_PLUGIN_API", None))
            if problem is None:
                pm.register(module, name=ep.name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - anything a foreign package does at import, sys.exit too
            error = f"{type(exc).__name__}: {exc}"
            pm.failed_plugins[ep.name] = error
            warnings.warn(
                f"tdlm plugin {ep.name!r} (package {dist}) failed to load and was skipped: "
                f"{error}. Fix or uninstall that package (`pip uninstall {dist}`).",
                stacklevel=3,
            )
            continue
        if problem is not None:
            pm.failed_plugins[ep.name] = problem
            warnings.warn(f"tdlm plugin {ep.name!r} (package {dist}) was skipped: {problem}. Install a version "
                          f"of {dist} written for this tdlm, or uninstall it (`pip uninstall {dist}`).",
                          stacklevel=3)
            continue
        pm.plugin_distinfo = getattr(pm, "plugin_distinfo", {})
        pm.plugin_distinfo[ep.name] = ep.dist
        unknown = _unknown_hooks(pm, ep.name)
        if unknown:
            error = (f"implements {', '.join(unknown)}, which tdlm does not know (hooks tdlm knows: "
                     f"{', '.join(_HOOK_OF_KIND.values())})")
            pm.unregister(name=ep.name)
            pm.failed_plugins[ep.name] = error
            warnings.warn(f"tdlm plugin {ep.name!r} (package {dist}) was skipped: it {error}. Fix the hook's "
                          f"name in that package, or uninstall it (`pip uninstall {dist}`).", stacklevel=2)


def plugin_api_problem(required) -> str | None:
    """Why a plugin module that declares `TDLM_PLUGIN_API = required` cannot run on this tdlm, or
    None when it can (or declares nothing). "1" needs major version 1; "1.2" needs major 1 and at
    least minor 2 (tdlm.PLUGIN_API_VERSION)."""
    if required is None:
        return None
    text = ".".join(map(str, required)) if isinstance(required, tuple) else str(required).strip()
    parts = text.split(".")
    have = ".".join(map(str, PLUGIN_API_VERSION))
    if not 1 <= len(parts) <= 2 or not all(part.isdigit() for part in parts):
        return f"its TDLM_PLUGIN_API = {required!r} is not a version such as \"1\" or \"1.0\" (this tdlm has {have})"
    major, minor = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    if major != PLUGIN_API_VERSION[0] or minor > PLUGIN_API_VERSION[1]:
        return (f"it needs tdlm plugin API {text}, and this tdlm ({__version__}) has plugin API {have} "
                "(a new major version breaks plugins)")
    return None


def describe_options(config_cls: type) -> list[dict]:
    """A component's options as its users read them: name, type, default and the description
    from the option's docstring in the Config class."""
    rows = []
    for name, info in sorted(config_cls.model_fields.items()):
        kind = info.annotation
        kind = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        rows.append({"name": name, "type": kind, "required": info.is_required(), "default": default,
                     "doc": " ".join((info.description or "").split())})
    return rows


def _unknown_hooks(pm: pluggy.PluginManager, plugin_name: str) -> list[str]:
    """The hooks a registered plugin implements that no hookspec declares (the names of
    pluggy's check_pending, for one plugin)."""
    plugin = pm.get_plugin(plugin_name)
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or []
                  if caller.spec is None and any(not impl.optionalhook for impl in caller.get_hookimpls()
                                                 if impl.plugin is plugin))


def _origin(pm: pluggy.PluginManager, plugin_name: str) -> tuple[str, str]:
    dist = getattr(pm, "plugin_distinfo", {}).get(plugin_name)
    if dist is not None:
        return dist.name, dist.version
    return "tdlm", __version__


def build_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """Call every plugin's hooks one plugin at a time, so each component knows who registered it.

    A component whose class does not fit this tdlm's plugin API (tdlm.components.fit) is a
    ComponentRefused for a plugin registered in code (a test, the built-ins); an installed package
    with one is skipped whole, with a warning naming the problem, as one that fails to import is:
    `Registry.failed` keeps the reason and a recipe naming any of its components is told it.
    """
    pm = pm or get_plugin_manager()
    registry = Registry(failed=dict(getattr(pm, "failed_plugins", {})))
    installed = getattr(pm, "plugin_distinfo", {})
    refused: dict[str, list[tuple[str, str, str]]] = {}  # installed plugin -> (kind, name, problem) per component
    for kind, hook_name in _HOOK_OF_KIND.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            package, version = _origin(pm, impl.plugin_name)

            def register(name: str, cls: type, *, _impl=impl, _kind=kind, _pkg=package, _ver=version):
                try:
                    registry.add(Component(_kind, name, cls, _impl.plugin_name, _pkg, _ver))
                except ComponentRefused as exc:
                    if _impl.plugin_name not in installed:
                        raise
                    refused.setdefault(_impl.plugin_name, []).append((_kind, name, str(exc)))

            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout is the command's (--json)
                    impl.function(register=register)
            except (PluginError, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - a hook's sys.exit too: one line, not a silent exit
                raise PluginError(
                    f"plugin {impl.plugin_name!r} ({package}) failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    for plugin, entries in refused.items():
        _skip_refused(registry, plugin, getattr(installed[plugin], "name", "?"), entries)
    return registry


def _skip_refused(registry: Registry, plugin: str, dist: str, entries: list[tuple[str, str, str]]) -> None:
    """Take every component of an installed plugin out of the registry, because one of them does
    not fit this tdlm: a plugin is loaded whole or not at all. Warn once, naming the problem."""
    problem = entries[0][2]
    for kind, components in registry.components.items():
        for name in [name for name, c in components.items() if c.plugin == plugin]:
            del components[name]
            registry.refused[kind, name] = (f"{kind} {name!r} was not loaded: its plugin {plugin!r} (package {dist}) "
                                            f"was skipped because {problem}")
    for kind, name, message in entries:
        registry.refused[kind, name] = message
    registry.failed[plugin] = problem
    warnings.warn(f"tdlm plugin {plugin!r} (package {dist}) was skipped: {problem}. Update it for this tdlm, or "
                  f"uninstall it (`pip uninstall {dist}`).", stacklevel=3)
