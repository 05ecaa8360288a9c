"""Moved to tdlm.components.next_token (the components layer, where the samplers live); this old
path re-exports it. Plugins import `next_token_probs` and `filter_probs` from tdlm.plugin."""

from tdlm.components.next_token import filter_probs, next_token_probs

__all__ = ["filter_probs", "next_token_probs"]
