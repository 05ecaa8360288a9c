"""Draft networks for the speculative samplers: any trained masked-diffusion run can draft.

A draft only has to propose; the target verifies, so the samples follow the target exactly
whatever the draft is. It must, however, speak the target's vocabulary (same real-token count,
mask id and BOS id: train both runs with the same tokenizer) and see at least the canvas's
length. The speculative samplers use a draft net as a plain denoiser `net(x) -> logits [B, N, V]`
over a canvas with mask ids, i.e. a bidirectional (diffusion) network, never a causal one.

A sampler never loads a run itself: reading run directories is the runs layer's job. It gets a
loader through its `RunContext.load_draft` (tdlm.rundir.load_draft, set by whoever loads the run
being sampled), or a network assigned in code (`sampler.draft_net`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tdlm.components.common import VocabInfo
from tdlm.errors import TdlmError


class DraftError(TdlmError, ValueError):
    """The draft cannot draft for this target (vocabulary, length or kind of model), or there is
    none: a user error, reported in one line."""


@dataclass
class Draft:
    """A draft network and the vocabulary it was trained with (what `RunContext.load_draft` returns)."""

    net: nn.Module
    vocab: VocabInfo
    run_dir: Path | None = None
    checkpoint: Path | None = None


def check_draft(net: nn.Module, target_vocab: VocabInfo, length: int, *,
                draft_vocab: VocabInfo | None = None, name: str = "draft") -> None:
    """Raise DraftError if `net` cannot draft canvases of `length` tokens in the target's vocabulary.

    Checks what the net exposes: a tdlm Transformer has `vocab_size`, `max_len` and `causal`;
    other modules (test oracles) are taken at their word.
    """
    size = draft_vocab.size if draft_vocab is not None else getattr(net, "vocab_size", None)
    if size is not None and size != target_vocab.size:
        raise DraftError(f"{name} has {size} real tokens but the target has {target_vocab.size}: "
                         "train both runs with the same tokenizer")
    ids = (target_vocab.mask_id, target_vocab.bos_id)
    if draft_vocab is not None and (draft_vocab.mask_id, draft_vocab.bos_id) != ids:
        raise DraftError(f"{name}'s mask/BOS ids {draft_vocab.mask_id}/{draft_vocab.bos_id} differ from the "
                         f"target's {target_vocab.mask_id}/{target_vocab.bos_id}: use the same tokenizer")
    max_len = getattr(net, "max_len", None)
    if max_len is not None and length > max_len:
        raise DraftError(f"{name} sees at most {max_len} tokens; the canvas has {length}")
    if getattr(net, "causal", False):
        raise DraftError(f"{name} is a causal network; a draft must be a bidirectional (diffusion) denoiser")


class DraftMixin:
    """For samplers with options `draft` (a run directory) and `draft_checkpoint`.

    Set `sampler.draft_net = module` to draft with a network built in code (tests, notebooks);
    otherwise the run named by `draft` is loaded on first use, onto the canvas's device, with the
    loader the sampler's context carries (`RunContext.load_draft`).
    """

    draft_net: nn.Module | None = None
    _draft_vocab: VocabInfo | None = None
    _draft_device: torch.device | None = None

    def get_draft(self, length: int, device: torch.device) -> nn.Module:
        if self.draft_net is None or (self._draft_device is not None and self._draft_device != device):
            if self.config.draft is None:
                raise DraftError(
                    f"the {type(self).__name__} needs a draft model: set the sampler option "
                    "draft = \"runs/<a diffusion run>\" (e.g. `tdlm sample RUN --option draft=runs/tiny-mdlm`) "
                    "or assign `sampler.draft_net` in code"
                )
            load_draft = getattr(self.context, "load_draft", None)
            if load_draft is None:
                raise DraftError(
                    f"the {type(self).__name__} was built without a way to read run directories (its RunContext "
                    f"has no load_draft), so it cannot load the draft {self.config.draft!r}: build it with a "
                    "context from tdlm.rundir.load_run, or assign `sampler.draft_net` in code"
                )
            draft = load_draft(self.config.draft, which=self.config.draft_checkpoint, device=device)
            self.draft_net, self._draft_vocab, self._draft_device = draft.net, draft.vocab, torch.device(device)
        check_draft(self.draft_net, self.vocab, length, draft_vocab=self._draft_vocab)
        return self.draft_net
