"""tdlm's built-in components (schedules, corruptions, objectives, samplers), registered through
the same hooks a third-party plugin uses; tdlm.registry.BUILTIN_PLUGINS lists the modules.
"""
