"""Moved to tdlm.components.draft (the components layer, where the samplers live); this old path
re-exports it. Loading a draft run is the runs layer's job: `load_draft` is tdlm.rundir.load_draft,
and a sampler reaches it through its RunContext. Plugins import the rest from tdlm.plugin."""

from tdlm.components.draft import Draft, DraftError, DraftMixin, check_draft

__all__ = ["Draft", "DraftError", "DraftMixin", "check_draft"]
