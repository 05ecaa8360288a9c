"""tdlm: tiny discrete diffusion language models, side by side with an autoregressive baseline.

Nothing heavy is imported here: `tdlm --help` and `tdlm plugins` must stay fast, so torch is
imported by the modules that need it, when they are first used.
"""

from tdlm.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
