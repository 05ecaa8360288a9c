"""A prepared shard folder: its layout, reading it back, and streaming its train split.

`tdlm data prepare SOURCE --out DIR --seq-len L --shard-size S` (tdlm.data.shards_prepare)
writes:

    DIR/manifest.json            written last: a folder without it is unfinished (schema below)
    DIR/tokenizer.json           the tokenizer, so DIR needs nothing else to train or decode
    DIR/train_token_counts.npy   int64 [vocab size]: each id's count in the whole train stream
    DIR/{split}-{i:06d}.tar      split = train | valid | test: webdataset tar shards

Each split is tokenised exactly as dataset='text' tokenises a file and cut into sequences of
L tokens exactly as `pack` cuts it; shard i holds sequences [i*S, (i+1)*S) of the split, in
stream order. A sequence is one webdataset sample: key "{split}-{index:09d}" (its index in the
split) and one field "tokens.npy", an int32 [L] array in NumPy's .npy format (so
`webdataset.WebDataset(url).decode()` reads it too). The leftover tail (< L tokens) of each
split is kept in the manifest, so evaluation can score every valid/test token; training drops
train's tail, as training on packed text does. Every file is checked against the manifest's
sha256 when read; reading needs tarfile and numpy only, not webdataset.

manifest.json (version 1):

    {"format": "tdlm-shards", "version": 1, "source": "wikitext2" | "/abs/text/folder" | "hf:NAME[:CONFIG]",
     "seq_len": L, "shard_size": S, "sample_field": "tokens.npy", "dtype": "int32",
     "tokenizer": {"kind": "gpt2" | "bpe", "name": "gpt2" | "bpe<N>-<hash8>", "bpe_vocab_size": N | null,
                   "file": "tokenizer.json", "sha256": ..., "vocab_size": V, "bos_id": ..., "mask_id": V},
     "train_token_counts": {"file": "train_token_counts.npy", "sha256": ...},
     "splits": {"train" | "valid" | "test": {
         "tokens": T, "sequences": n, "bytes": UTF-8 bytes of the split's text,
         "tail": [ids of the last T - n*L tokens],
         "shards": [{"file": "train-000000.tar", "sequences": k, "sha256": ...}, ...]}}}

Train order (`ShardStream`), a pure function of (seed, step) like `BatchStream`: epoch e visits
the shards in a permutation drawn from (seed, e) and, inside shard k, its sequences in a
permutation drawn from (seed, e, k) (numpy's PCG64, seeded by SeedSequence(seed mod 2**64,
spawn_key=(0, e)) and (1, e, k)). Global batch s is the G rows [i*G, (i+1)*G) of that epoch
order, i = s mod batches_per_epoch; rank r of W takes rows [r*G/W, (r+1)*G/W); the last
partial batch of an epoch is dropped. So a batch draws from one shard or two neighbours in the
shuffled shard order, not from the whole split: the usual price of streaming, small when a
shard holds many batches' worth of sequences.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from tdlm.data.manifest import (  # noqa: F401 - the layout's names, re-exported
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ShardError,
    prepare_again,
    read_manifest,
)
from tdlm.data.packing import GlobalBatches
from tdlm.data.tokenizer import Vocab, vocab_from_tokenizer

TOKENIZER_FILE = "tokenizer.json"
COUNTS_FILE = "train_token_counts.npy"
SAMPLE_FIELD = "tokens.npy"
TAR_BLOCK = 512  # a tar header, and the unit file data is padded to
SHARD_CACHE = 2  # decoded shards kept: the one being read and its neighbour across a boundary


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def check_seq_len(manifest: dict, seq_len: int, directory: str | Path) -> None:
    if manifest["seq_len"] != seq_len:
        raise ShardError(
            f"the shards in {directory} hold sequences of {manifest['seq_len']} tokens but data.seq_len is "
            f"{seq_len}: set data.seq_len = {manifest['seq_len']}, or prepare shards with --seq-len {seq_len}"
        )


def read_checked(directory: Path, entry: dict, manifest: dict) -> bytes:
    """The bytes of the file a manifest entry names, once checked against its sha256."""
    path = directory / entry["file"]
    fix = f"re-run `{prepare_again(manifest, directory)}`"
    if not path.is_file():
        raise ShardError(f"{path} is missing; {fix}")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise ShardError(f"{path} is truncated or corrupt (its sha256 is not the manifest's); {fix}")
    return raw


def read_shard(directory: Path, entry: dict, manifest: dict) -> np.ndarray:
    """int32 [entry['sequences'], seq_len]: one shard's sequences in stored order."""
    raw = read_checked(directory, entry, manifest)
    try:
        return decode_shard(raw, entry["sequences"], manifest["seq_len"])
    except (tarfile.TarError, ValueError, OSError) as exc:
        raise ShardError(
            f"{directory / entry['file']} is not a shard of {entry['sequences']} int32 sequences of "
            f"{manifest['seq_len']} tokens as the manifest says ({exc}); re-run `{prepare_again(manifest, directory)}`"
        ) from exc


def decode_shard(raw: bytes, sequences: int, seq_len: int) -> np.ndarray:
    """int32 [sequences, seq_len] from a shard's bytes, in one pass.

    Prepare writes every sample as one plain tar member of the same size, so sample k's header
    starts at k * stride: reading them all as one array is ~100x faster than a tarfile and an
    np.load call per sample (~0.4 ms each). Anything irregular raises ValueError."""
    if sequences == 0:
        return np.zeros((0, seq_len), dtype=np.int32)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        first = tar.next()  # checks the first header's checksum
    if first is None or not first.isfile() or first.offset_data != TAR_BLOCK:
        raise ValueError("the first sample is not a plain tar member")
    if not first.name.endswith(f".{SAMPLE_FIELD}"):
        raise ValueError(f"its first member is {first.name!r}, not a {SAMPLE_FIELD} field")
    npy = raw[TAR_BLOCK : TAR_BLOCK + first.size]
    row = np.load(io.BytesIO(npy), allow_pickle=False)
    if row.shape != (seq_len,) or row.dtype != np.dtype("<i4"):
        raise ValueError(f"its first sample is {row.dtype} {row.shape}")
    stride = TAR_BLOCK + -(-first.size // TAR_BLOCK) * TAR_BLOCK
    body = sequences * stride
    if len(raw) < body or any(raw[body:]):  # after the last sample, only the end-of-archive zeros
        raise ValueError(f"it does not hold exactly {sequences} samples")
    frames = np.frombuffer(raw, np.uint8, body).reshape(sequences, stride)
    npy_header = first.size - 4 * seq_len
    same = [slice(124, 136), slice(257, 262), slice(TAR_BLOCK, TAR_BLOCK + npy_header)]  # size, "ustar", .npy header
    if any((frames[:, part] != frames[0, part]).any() for part in same):
        raise ValueError("its samples are not all alike")
    tokens = frames[:, TAR_BLOCK + npy_header : TAR_BLOCK + first.size]
    return np.ascontiguousarray(tokens).view("<i4").astype(np.int32, copy=False)


def split_tokens(directory: str | Path, manifest: dict, split: str) -> np.ndarray:
    """The whole 1-D int32 token stream of a split: its shards in order, then its tail."""
    directory = Path(directory).expanduser()
    entry = manifest["splits"][split]
    pieces = [read_shard(directory, shard, manifest).reshape(-1) for shard in entry["shards"]]
    tokens = np.concatenate([*pieces, np.asarray(entry["tail"], dtype=np.int32)])
    if len(tokens) != entry["tokens"]:
        raise ShardError(f"{split} of {directory} holds {len(tokens)} tokens, not the manifest's {entry['tokens']}")
    return tokens


def load_shard_vocab(directory: str | Path, manifest: dict) -> Vocab:
    from tokenizers import Tokenizer

    directory = Path(directory).expanduser()
    facts = manifest["tokenizer"]
    raw = read_checked(directory, facts, manifest)
    vocab = vocab_from_tokenizer(Tokenizer.from_str(raw.decode("utf-8")), facts["name"])
    found = (vocab.size, vocab.bos_id, vocab.mask_id)
    if found != (facts["vocab_size"], facts["bos_id"], facts["mask_id"]):
        raise ShardError(
            f"{directory / facts['file']} gives (vocab_size, bos_id, mask_id) = {found}, the manifest says "
            f"{(facts['vocab_size'], facts['bos_id'], facts['mask_id'])}; re-run `{prepare_again(manifest, directory)}`"
        )
    return vocab


def train_token_counts(directory: str | Path, manifest: dict, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: each id's count in the whole train stream, as the folder records it."""
    directory = Path(directory).expanduser()
    raw = read_checked(directory, manifest["train_token_counts"], manifest)
    counts = np.load(io.BytesIO(raw), allow_pickle=False)
    if counts.shape != (vocab_size,):
        raise ShardError(f"{directory / COUNTS_FILE} has shape {counts.shape}, expected ({vocab_size},)")
    return counts.astype(np.int64)


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Fixed-length keys with a leading tag: the shard order (0, e) and an in-shard order
    # (1, e, k) never share a seed.
    return np.random.default_rng(np.random.SeedSequence(seed % (1 << 64), spawn_key=key))


class ShardStream(GlobalBatches):
    """BatchStream's interface and guarantees, read from train shards on demand: `get(step)` is
    a pure function of (seed, step), rank r of W gets its slice of the same global batch, and
    only the shards holding that batch are read (order: see the module docstring).

    `manifest_dir` is a folder `tdlm data prepare` wrote. At most max(SHARD_CACHE, shards a
    batch spans + 1) decoded shards are kept, each with the epoch's in-shard order applied.
    """

    def __init__(self, manifest_dir: str | Path, global_batch: int, seed: int, *, rank: int = 0, world_size: int = 1):
        self.directory = Path(manifest_dir).expanduser()
        self.manifest = read_manifest(self.directory)
        self.seq_len = self.manifest["seq_len"]
        self.shards = self.manifest["splits"]["train"]["shards"]
        self.shard_sizes = np.array([shard["sequences"] for shard in self.shards], dtype=np.int64)
        super().__init__(
            int(self.shard_sizes.sum()), global_batch, seed, rank=rank, world_size=world_size,
            too_few=f"train sequences of length {self.seq_len} in {self.directory}, fewer than one global "
                    f"batch of {global_batch}: lower the batch size, or prepare shards from more text",
        )
        smallest = int(self.shard_sizes[self.shard_sizes > 0].min())
        self.cache_size = max(SHARD_CACHE, -(-self.local_batch // smallest) + 1)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (epoch, shard) -> rows
        self._epoch, self._order, self._starts = None, None, None  # the current epoch's shard order

    def get(self, step: int) -> torch.LongTensor:
        """This rank's rows [global_batch // world_size, seq_len] of global batch `step`."""
        epoch, start = self.local_rows(step)
        order, starts = self._shard_order(epoch)
        position = int(np.searchsorted(starts, start, side="right")) - 1  # the shard holding row `start`
        pieces, stop = [], start + self.local_batch
        while start < stop:
            shard = int(order[position])
            end = min(stop, int(starts[position + 1]))
            rows = self._shuffled_shard(epoch, shard)
            pieces.append(rows[start - starts[position] : end - starts[position]])
            start, position = end, position + 1
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64))

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and where each shard's rows start in the epoch order (+ the end)."""
        if epoch != self._epoch:
            order = _rng(self.seed, 0, epoch).permutation(len(self.shards))
            self._epoch, self._order = epoch, order
            self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes[order])])
        return self._order, self._starts

    def _shuffled_shard(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        rows = read_shard(self.directory, self.shards[shard], self.manifest)
        rows = rows[_rng(self.seed, 1, epoch, shard).permutation(len(rows))]
        self._cache[key] = rows
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return rows
