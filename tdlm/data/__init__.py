"""Data: WikiText-2 or a folder of text, a byte-level BPE vocabulary with a mask id, token
streams cached on disk, and deterministic batches.

    cfg = DataConfig(seq_len=128)
    corpus = load_corpus(cfg)                        # .vocab, .splits["train" | "valid" | "test"]
    batches = train_stream(corpus, cfg, global_batch=64, seed=0)
    x = batches.get(step)                            # [64, 128] long

format='text' packs the train split (`pack`) into a BatchStream; format='webdataset' streams
shards that `tdlm data prepare` wrote (ShardStream, layout in tdlm.data.shards), and its corpus
holds valid/test plus the train token counts only.

Only numpy and pydantic are imported here: the parts that need torch or tokenizers load on
first use, so that importing a recipe's config stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from tdlm.data.config import DataConfig
from tdlm.data.locate import DataNotFoundError

if TYPE_CHECKING:
    from tdlm.data.corpus import Corpus, load_corpus
    from tdlm.data.packing import BatchStream, pack
    from tdlm.data.shards import ShardError, ShardStream
    from tdlm.data.shards_prepare import prepare_shards
    from tdlm.data.streams import train_stream, train_tokens
    from tdlm.data.tokenizer import Vocab, load_vocab

_LAZY = {
    "Vocab": "tdlm.data.tokenizer",
    "load_vocab": "tdlm.data.tokenizer",
    "Corpus": "tdlm.data.corpus",
    "load_corpus": "tdlm.data.corpus",
    "pack": "tdlm.data.packing",
    "BatchStream": "tdlm.data.packing",
    "ShardStream": "tdlm.data.shards",
    "ShardError": "tdlm.data.shards",
    "prepare_shards": "tdlm.data.shards_prepare",
    "train_stream": "tdlm.data.streams",
    "train_tokens": "tdlm.data.streams",
}

__all__ = ["DataConfig", "DataNotFoundError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
