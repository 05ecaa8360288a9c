"""tdlm: tiny discrete diffusion language models, side by side with an autoregressive baseline.

Nothing heavy is imported here: `tdlm --help` and `tdlm plugins` must stay fast, so torch is
imported by the modules that need it, when they are first used.
"""

from tdlm.hookspecs import hookimpl

__version__ = "0.1.0"
PLUGIN_API_VERSION = (1, 2)
"""The version of the plugin interface (docs/plugins.md): (major, minor). A new major version
breaks plugins (a method or argument removed or changed); a new minor one only adds. A plugin
module may require one with `TDLM_PLUGIN_API = "1"` (or "1.2": at least that minor version).
Everything a plugin may use is in `tdlm.plugin`."""
__all__ = ["hookimpl", "__version__", "PLUGIN_API_VERSION"]
