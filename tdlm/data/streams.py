"""The train split a recipe's [data] section asks for, batched or whole: one call, whatever the format."""

from __future__ import annotations

from tdlm.data.config import DataConfig
from tdlm.data.corpus import Corpus


def train_stream(corpus: Corpus, cfg: DataConfig, global_batch: int, seed: int, *, rank: int = 0, world_size: int = 1):
    """A BatchStream over the packed train split (format='text'), or a ShardStream over the
    train shards in cfg.path (format='webdataset'). Both give, for global step s, the same
    global batch whatever world_size is; rank r gets its rows of it."""
    if cfg.format == "webdataset":
        from tdlm.data.shards import ShardStream, check_seq_len

        stream = ShardStream(cfg.path, global_batch, seed, rank=rank, world_size=world_size)
        check_seq_len(stream.manifest, cfg.seq_len, stream.directory)
        return stream
    from tdlm.data.packing import BatchStream, pack

    sequences, _ = pack(corpus.splits["train"], cfg.seq_len)
    return BatchStream(sequences, global_batch, seed, rank=rank, world_size=world_size)


def train_tokens(corpus: Corpus, cfg: DataConfig):
    """The whole 1-D train token stream: in memory for text data, read from every train shard
    for webdataset (for statistics over all of it, e.g. the train bigrams)."""
    if cfg.format == "webdataset":
        from tdlm.data.shards import read_manifest, split_tokens

        return split_tokens(cfg.path, read_manifest(cfg.path), "train")
    return corpus.splits["train"]
