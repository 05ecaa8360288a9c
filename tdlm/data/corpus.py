"""Token streams of the train/valid/test splits: tokenised once, then loaded from a .npy cache.

How text becomes a stream: each line is tokenised with its trailing "\\n" and the lines' ids are
concatenated in file order, so the stream decodes back to the file byte for byte; with
`data.documents` other than 'as-is', an end-of-text token also ends each document
(tdlm.data.documents). Per line, `encode_batch` can use every core; on WikiText-2 with
GPT-2 the ids equal those of tokenising each whole file at once (train 2,448,382, valid
258,659, test 295,877 tokens, the data README's counts). A literal "<|endoftext|>" in a text
file becomes the end-of-text id, so documents of a "text" dataset can be separated with it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tdlm.data.config import DataConfig
from tdlm.data.documents import document_ends, insert_end_of_text
from tdlm.errors import TdlmError
from tdlm.data.locate import cache_root, find_split_files
from tdlm.files import write_atomically
from tdlm.data.tokenizer import Vocab, load_vocab, split_lines, utf8_text, warn_rebuild

# Part of every cache key: bump it when the way text becomes tokens changes, so that old
# caches are not silently reused.
CACHE_FORMAT = 1
ENCODE_CHUNK_LINES = 2048  # lines per encode_batch call: big enough to keep all cores busy


@dataclass(eq=False)
class Corpus:
    vocab: Vocab
    splits: dict[str, np.ndarray]
    """'train', 'valid', 'test' -> 1-D int32 token stream. A webdataset corpus holds only
    'valid' and 'test': its train split is streamed from shards (`tdlm.data.train_stream`)."""
    train_token_counts: np.ndarray | None = None
    """int64 [vocab.size]: how often each id occurs in the train split, when the train stream is
    not in `splits` (webdataset: read from the manifest); None means count splits['train']."""

    def num_bytes(self, tokens: np.ndarray) -> int:
        """UTF-8 bytes of the text these tokens spell: the denominator of bits per byte."""
        return int(self.vocab.token_bytes[np.asarray(tokens)].sum())


def load_corpus(cfg: DataConfig, *, cache_dir: str | Path | None = None, progress: bool = True) -> Corpus:
    """The vocabulary and the three token streams that `cfg` describes (train cut to
    `cfg.max_train_tokens` if set). Tokens are cached under `cache_dir` (default
    $TDLM_CACHE_DIR or ~/.cache/tdlm) by the file's content and the tokenizer.

    format='webdataset': the vocabulary, valid and test from the prepared folder, and the train
    split's token counts instead of its stream (see tdlm.data.shards)."""
    if cfg.format == "webdataset":
        return shard_corpus(cfg)
    files = find_split_files(cfg, cache_dir)
    vocab = load_vocab(cfg, cache_dir=cache_dir)
    splits = {
        split: cached_tokens(path, vocab, tokenizer_hash(vocab), cache_dir=cache_dir, progress=progress,
                             documents=cfg.documents)
        for split, path in files.items()
    }
    if cfg.max_train_tokens is not None:
        splits["train"] = splits["train"][: cfg.max_train_tokens]
    return Corpus(vocab, splits)


def shard_corpus(cfg: DataConfig) -> Corpus:
    """The vocabulary, the valid and test streams (the same tokens as format='text' would give)
    and the train token counts of the prepared folder cfg.path; train itself is left to
    ShardStream (tdlm.data.shards, which reads the folder and knows nothing of Corpus)."""
    from tdlm.data import shards  # pulls in torch: only when asked for

    directory = Path(cfg.path).expanduser()
    manifest = shards.read_manifest(directory)
    shards.check_seq_len(manifest, cfg.seq_len, directory)
    vocab = shards.load_shard_vocab(directory, manifest)
    splits = {split: shards.split_tokens(directory, manifest, split) for split in ("valid", "test")}
    return Corpus(vocab, splits, train_token_counts=shards.train_token_counts(directory, manifest, vocab.size))


def tokenizer_hash(vocab: Vocab) -> str:
    """The tokenizer's identity in the token cache's keys."""
    return hashlib.sha256(vocab.tokenizer.to_str().encode("utf-8")).hexdigest()


def cached_tokens(
    path: Path, vocab: Vocab, tokenizer_hash: str, *, cache_dir: str | Path | None = None, progress: bool = True,
    documents: str = "as-is",
) -> np.ndarray:
    """Tokens of the text file at `path` (documents marked by the rule `documents`), from the
    cache when the same file content was already tokenised by the same tokenizer and rule."""
    raw = path.read_bytes()
    parts = [str(CACHE_FORMAT).encode(), hashlib.sha256(raw).digest(), tokenizer_hash.encode()]
    if documents != "as-is":  # (as-is keys stay those of caches written before the rule existed)
        parts.append(documents.encode())
    key = hashlib.sha256(b"\n".join(parts))
    folder, entry = cache_root(cache_dir) / "tokens", f"{path.stem}-{vocab.name}-{key.hexdigest()[:16]}"
    # <entry>-<checksum of the tokens>.npy; an entry without a checksum (older tdlm) is tokenised again
    found = sorted(folder.glob(f"{entry}*.npy"))
    for cached in found:
        tokens = read_cached_tokens(cached, vocab, cached.name[len(entry) + 1 : -len(".npy")])
        if tokens is not None:
            return tokens
    lines = split_lines(utf8_text(raw, path))
    tokens = tokenize_lines(vocab, lines, desc=f"tokenising {path.name}", progress=progress,
                            ends=document_ends(lines, documents))
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    # (every entry found was unusable and read_cached_tokens deleted it; this one may have the
    # same name as a damaged one, rebuilt)
    write_atomically(folder / f"{entry}-{tokens_checksum(tokens)}.npy", buffer.getvalue())
    return tokens


def tokens_checksum(tokens: np.ndarray) -> str:
    """What a token cache entry's name ends with: a bit flipped on disk is then seen, not trusted."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]


def read_cached_tokens(cached: Path, vocab: Vocab, checksum: str) -> np.ndarray | None:
    """A token cache entry, or None (the entry deleted, with a warning) when it is damaged: not
    a .npy file, cut short, not a 1-D int32 array of ids of this vocabulary, or with tokens whose
    checksum is not the one in its name (`checksum`; "" for an entry of an older tdlm, which has
    none and is tokenised again)."""
    if not checksum:
        cached.unlink(missing_ok=True)
        return None
    try:
        tokens = np.load(cached, allow_pickle=False)
        if tokens.ndim != 1 or tokens.dtype != np.int32:
            raise ValueError(f"a {tokens.dtype} array of shape {tokens.shape}, not 1-D int32")
        if len(tokens) and not (0 <= int(tokens.min()) and int(tokens.max()) < vocab.size):
            raise ValueError(f"ids outside [0, {vocab.size})")
        if tokens_checksum(tokens) != checksum:
            raise ValueError("its tokens do not match the checksum in its name: bits changed on disk")
        return tokens
    except (OSError, ValueError, EOFError) as exc:
        warn_rebuild(cached, (str(exc).strip().splitlines() or [type(exc).__name__])[0], "tokenising again")
        return None


def tokenize_lines(vocab: Vocab, lines: list[str], *, desc: str = "tokenising", progress: bool = True,
                   ends: list[int] = ()) -> np.ndarray:
    """The lines' ids, concatenated, as int32, with an end-of-text id before each line index in
    `ends` (tdlm.data.documents.document_ends)."""
    pieces = []
    with tqdm(total=len(lines), unit="line", desc=desc, disable=not progress) as bar:
        for start in range(0, len(lines), ENCODE_CHUNK_LINES):
            chunk = lines[start : start + ENCODE_CHUNK_LINES]
            pieces += [np.asarray(e.ids, dtype=np.int32) for e in vocab.tokenizer.encode_batch(chunk)]
            bar.update(len(chunk))
    pieces = insert_end_of_text(pieces, list(ends), vocab.bos_id)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


class TextFileError(TdlmError):
    """A text file handed to tdlm that it cannot score: missing, empty, binary or not UTF-8."""


def text_file_tokens(path: str | Path, vocab: Vocab, *, cache_dir: str | Path | None = None,
                     progress: bool = False, documents: str = "as-is") -> np.ndarray:
    """The tokens of any UTF-8 text file, exactly as a split with the same content is tokenised
    (the same lines, documents marked by the same rule, the same cache), for scoring text a
    model was not trained on."""
    path = Path(path)
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file" if path.exists()
                else "is a symbolic link to nothing" if path.is_symlink() else ": no such file")
        raise TextFileError(f"{path}{'' if what.startswith(':') else ' '}{what} (give a UTF-8 text file to score)")
    raw = path.read_bytes()
    if not raw.strip():
        raise TextFileError(f"{path} is empty: there is nothing to score")
    if b"\x00" in raw:
        raise TextFileError(f"{path} looks binary (it holds NUL bytes): give a UTF-8 text file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextFileError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                            "convert it first, e.g. iconv -f latin1 -t utf-8") from exc
    return cached_tokens(path, vocab, tokenizer_hash(vocab), cache_dir=cache_dir, progress=progress,
                         documents=documents)
