"""The vocabulary: a byte-level BPE tokenizer plus the extra mask id the diffusion models need.

Two tokenizers: the GPT-2 BPE read from vocab.json + merges.txt, or a byte-level BPE trained on
the train split (cached by a hash of that text, the vocab size and the tokenizers version).
"""

from __future__ import annotations

import hashlib
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tdlm.data.config import DataConfig
from tdlm.data.locate import cache_root, file_sha256, find_gpt2_files, find_split_files
from tdlm.files import write_atomically
from tdlm.errors import DataError

END_OF_TEXT = "<|endoftext|>"
MASK_TEXT = "<mask>"


@dataclass(eq=False)
class Vocab:
    tokenizer: Tokenizer = field(repr=False)
    size: int
    """Number of real token ids (GPT-2: 50257)."""
    bos_id: int
    """The <|endoftext|> id: BOS for autoregressive models and the end-of-text token."""
    mask_id: int
    """== size: a dedicated extra id that no text encodes to."""
    token_bytes: np.ndarray = field(repr=False)
    """int64 [size]: UTF-8 bytes spelt by each token id (0 for special tokens); for bits per byte."""
    name: str
    """'gpt2' or 'bpe<vocab size>-<hash8>'; names the token caches."""

    @property
    def model_size(self) -> int:
        """Embedding rows a model needs: the real tokens plus the mask."""
        return self.size + 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text of a 1-D sequence of ids (list, numpy or torch); mask ids are shown as '<mask>'."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, numbers.Integral) for i in ids):
            raise ValueError("decode expects a 1-D sequence of integer ids")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.model_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside [0, {self.model_size}) for vocab {self.name}")
        # Decode each run between masks on its own: the tokenizer knows nothing of the mask id.
        pieces, run = [], []
        for i in ids:
            if i == self.mask_id:
                pieces += [self.tokenizer.decode(run, skip_special_tokens=False), MASK_TEXT]
                run = []
            else:
                run.append(i)
        pieces.append(self.tokenizer.decode(run, skip_special_tokens=False))
        return "".join(pieces)


def load_vocab(cfg: DataConfig, *, cache_dir: str | Path | None = None) -> Vocab:
    """The vocabulary `cfg` asks for (training the BPE on the train split if not cached)."""
    if cfg.tokenizer == "gpt2":
        return vocab_from_tokenizer(gpt2_tokenizer(*find_gpt2_files(cfg, cache_dir)), "gpt2")
    train_path = find_split_files(cfg, cache_dir)["train"]
    return trained_bpe_vocab(train_path, cfg.bpe_vocab_size, cache_dir)


def gpt2_tokenizer(vocab_path: Path, merges_path: Path) -> Tokenizer:
    try:
        model = models.BPE.from_file(str(vocab_path), str(merges_path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"the GPT-2 tokenizer files {vocab_path} and {merges_path} cannot be read ({why}): one is "
                        "truncated or corrupt; copy them again (from the project's ../shared/data, or delete them "
                        "to fetch them from the hub)") from exc
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Already id 50256 in vocab.json; registering it as special makes "<|endoftext|>" in a text
    # encode to that one id instead of to the pieces "<", "|", "endoftext", ...
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def bpe_name(train_path: Path, vocab_size: int) -> str:
    """The trained BPE's name (and cache key): a hash of the train text, the vocabulary size and the
    tokenizers version, so another text or version trains and caches another BPE."""
    key = hashlib.sha256(f"{file_sha256(train_path)}\n{vocab_size}\n{tokenizers.__version__}".encode()).hexdigest()
    return f"bpe{vocab_size}-{key[:8]}"


def tokenizer_name(cfg: DataConfig, *, cache_dir: str | Path | None = None) -> str:
    """The name of the tokenizer `cfg` asks for (Vocab.name), known without loading or training it."""
    if cfg.tokenizer == "gpt2":
        return "gpt2"
    return bpe_name(find_split_files(cfg, cache_dir)["train"], cfg.bpe_vocab_size)


def trained_bpe_vocab(train_path: Path, vocab_size: int, cache_dir: str | Path | None = None) -> Vocab:
    name = bpe_name(train_path, vocab_size)
    cached = cache_root(cache_dir) / "tokenizers" / f"{name}.json"
    if cached.is_file():
        try:
            return vocab_from_tokenizer(Tokenizer.from_file(str(cached)), name)
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry: train the BPE again
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warn_rebuild(cached, why, "training the BPE again")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        # All 256 byte symbols, seen in the train text or not, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(read_lines(train_path), trainer=trainer)
    write_atomically(cached, tokenizer.to_str().encode("utf-8"))
    return vocab_from_tokenizer(tokenizer, name)


def warn_rebuild(path: Path, why: str, what: str) -> None:
    """A damaged cache entry: say so in one line and delete it (the caller builds it again)."""
    print(f"tdlm: warning: the cache entry {path} is damaged ({why}); deleted it, {what}", file=sys.stderr)
    path.unlink(missing_ok=True)


def vocab_from_tokenizer(tokenizer: Tokenizer, name: str) -> Vocab:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    bos_id = tokenizer.token_to_id(END_OF_TEXT)
    if bos_id is None:
        raise DataError(f"tokenizer {name} has no {END_OF_TEXT} token")
    return Vocab(tokenizer, size, bos_id, size, token_byte_lengths(tokenizer, size), name)


def token_byte_lengths(tokenizer: Tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes of each token. Byte-level BPE spells each byte as one of 256 printable
    characters (GPT-2's bytes_to_unicode), so a token's byte count is its character count,
    once checked that every character is one of those 256."""
    special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    ordinary = {token: i for token, i in tokenizer.get_vocab(with_added_tokens=True).items() if i not in special}
    foreign = set("".join(ordinary)) - set(pre_tokenizers.ByteLevel.alphabet())
    if foreign:
        raise DataError(f"not a byte-level BPE: tokens use {sorted(foreign)[:5]}, characters that stand for no byte")
    ids = np.fromiter(ordinary.values(), np.int64, len(ordinary))
    lengths = np.zeros(size, dtype=np.int64)
    lengths[ids] = np.fromiter(map(len, ordinary), np.int64, len(ordinary))
    return lengths


def read_lines(path: Path) -> list[str]:
    return split_lines(utf8_text(path.read_bytes(), path))


def split_lines(text: str) -> list[str]:
    """Lines with their "\\n" kept, split on "\\n" only (str.splitlines also splits on \\r,
    \\x0c, \\u2028, ...), so that "".join(lines) == text."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def utf8_text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it first, "
                        "e.g. iconv -f latin1 -t utf-8") from exc
