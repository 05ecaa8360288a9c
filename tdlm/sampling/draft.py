"""Moved to tdlm.components.draft (the components layer, where the samplers live); this old path
re-exports it. Loading a draft run is the runs layer's job: `load_draft` is tdlm.rundir.load_draft,
and a sampler reaches it through its RunContext. Plugins import the rest from tdlm.plugin."""

from tdlm.components.draft import Draft, DraftError, DraftMixin, check_draft

__all__ = ["Draft", "DraftError", "DraftMixin", "check_draft"]


def __getattr__(name: str):
    if name == "load_draft":  # the one name that moved up a layer: say where to
        raise ImportError("tdlm.sampling.draft.load_draft is tdlm.rundir.load_draft since plugin API 1.2 (a sampler "
                          "reads a draft run through RunContext.load_draft); see docs/plugins.md#upgrading-a-plugin")
    raise AttributeError(f"module 'tdlm.sampling.draft' has no attribute {name!r}")
