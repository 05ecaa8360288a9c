"""tdlm's built-in components, registered through the same hooks a third-party plugin uses.

Installed as the package `tdlm_plugins`; tdlm.plugins.BUILTIN_PLUGINS lists the modules.
"""
