"""Moved to tdlm.components.grids (the components layer, where the samplers live); this old path
re-exports it. Plugins import `time_grid` and `commit_count` from tdlm.plugin."""

from tdlm.components.grids import commit_count, time_grid

__all__ = ["commit_count", "time_grid"]
