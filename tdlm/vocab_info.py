"""The vocabulary facts components get (tdlm.components.VocabInfo), from a loaded corpus: the
one bridge from the data layer to the components, for training and for loading a run back."""

from __future__ import annotations

import numpy as np

from tdlm.components import VocabInfo


def vocab_info(corpus) -> VocabInfo:
    """The vocabulary facts components get, with the train split's token counts (from the
    manifest when the train split is streamed from shards)."""
    vocab = corpus.vocab
    counts = corpus.train_token_counts
    if counts is None:
        counts = np.bincount(corpus.splits["train"], minlength=vocab.size)[: vocab.size]
    return VocabInfo(size=vocab.size, mask_id=vocab.mask_id, bos_id=vocab.bos_id, token_counts=counts)
