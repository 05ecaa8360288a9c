"""The old name of tdlm.registry (before plugin API 1.0), kept so that code written against it
still runs; importing it warns. A plugin imports what it uses from `tdlm.plugin` (the plugin API),
and code that drives plugins from `tdlm.registry`: see docs/plugins.md#upgrading-a-plugin."""

import warnings

from tdlm.registry import (BUILTIN_PLUGINS, ENTRY_POINT_GROUP, KINDS, Component, PluginError, Registry,  # noqa: F401
                           ResolvedComponent, UnknownComponentError, build_registry, describe_options,
                           get_plugin_manager, plugin_api_problem)

warnings.warn("tdlm.plugins was renamed tdlm.registry: import hookimpl, the base classes and the test helpers "
              "(get_plugin_manager, build_registry, ...) from tdlm.plugin instead; see "
              "docs/plugins.md#upgrading-a-plugin", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    """Any other name of the plugin API, from the front door."""
    import tdlm.plugin

    if name in tdlm.plugin.__all__:
        return getattr(tdlm.plugin, name)
    raise AttributeError(f"module 'tdlm.plugins' (renamed tdlm.registry) has no attribute {name!r}; the plugin API "
                         "is tdlm.plugin.__all__ (docs/plugins.md#upgrading-a-plugin)")
