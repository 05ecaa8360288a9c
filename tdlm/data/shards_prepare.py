"""`tdlm data prepare`: tokenise a corpus once and write it as webdataset shards that training
streams (the folder's layout and manifest: tdlm.data.shards).

SOURCE is one of:
- a folder holding train.txt, valid.txt and test.txt (read as dataset='text' reads them);
- `wikitext2`: the local WikiText-2, found as dataset='wikitext2' finds it (--data-dir first);
- `hf:NAME[:CONFIG]`: `datasets.load_dataset(NAME, CONFIG)` (needs the hub, or a datasets cache
  that holds it). Its splits train, validation (or valid) and test, column "text": each row
  becomes one line ("\\n" added unless it ends with one), written under <cache>/hf-text/ and
  then read as a text folder.

Tokens come from the same code and the same token cache as format='text' (a BPE is trained on
the train split just as there), so shards and text give identical token streams. Shards are
written with a fixed mtime, so the same input gives byte-identical files and sha256s.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tdlm.data.config import DataConfig
from tdlm.data.corpus import cached_tokens
from tdlm.data.locate import (
    SPLITS,
    TEXT_FILES,
    DataNotFoundError,
    cache_root,
    file_sha256,
    find_gpt2_files,
    find_split_files,
)
from tdlm.data.packing import pack
from tdlm.data.shards import (
    COUNTS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SAMPLE_FIELD,
    TOKENIZER_FILE,
    shard_name,
)
from tdlm.data.tokenizer import Vocab, gpt2_tokenizer, trained_bpe_vocab, vocab_from_tokenizer
from tdlm.files import write_atomically
from tdlm.errors import DataError, TdlmError

HF_PREFIX = "hf:"
HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid"), "test": ("test",)}
# Files a prepare writes: --force removes these and nothing else.
OWN_FILE = re.compile(rf"({'|'.join(SPLITS)})-\d{{6}}\.tar|{re.escape(MANIFEST_FILE)}|"
                      rf"{re.escape(TOKENIZER_FILE)}|{re.escape(COUNTS_FILE)}")


def prepare_shards(
    source: str,
    out: str | Path,
    *,
    seq_len: int,
    shard_size: int,
    tokenizer: str = "gpt2",
    bpe_vocab_size: int = 4096,
    data_dir: str | Path | None = None,
    documents: str = "as-is",
    force: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Tokenise the three splits of `source`, write them to `out` as shards of `shard_size`
    sequences of `seq_len` tokens, and return the manifest (also written, last, to
    out/manifest.json). `out` must be empty or absent, or, with `force`, hold only files an
    earlier prepare wrote."""
    if seq_len < 2 or shard_size < 1:
        raise DataError(f"need seq_len >= 2 and shard_size >= 1, got {seq_len=}, {shard_size=}")
    if tokenizer not in ("gpt2", "bpe"):
        raise DataError(f"unknown tokenizer {tokenizer!r}; allowed: 'gpt2', 'bpe'")
    out = Path(out).expanduser()
    files, source_name = split_files(source, data_dir=data_dir, cache_dir=cache_dir)
    vocab = source_vocab(tokenizer, bpe_vocab_size, files["train"], data_dir=data_dir, cache_dir=cache_dir)
    tokenizer_json = vocab.tokenizer.to_str().encode("utf-8")
    # The same hash load_corpus keys its token cache with: prepare reuses (and fills) that cache.
    tokenizer_hash = hashlib.sha256(tokenizer_json).hexdigest()
    split_tokens = {split: cached_tokens(path, vocab, tokenizer_hash, cache_dir=cache_dir, progress=progress,
                                         documents=documents) for split, path in files.items()}
    check_trainable(split_tokens, files, seq_len)  # before anything is written
    claim_folder(out, force=force)

    write_atomically(out / TOKENIZER_FILE, tokenizer_json)
    splits = {}
    for split, path in files.items():
        tokens = split_tokens[split]
        splits[split] = write_split(out, split, tokens, seq_len, shard_size, progress=progress)
        splits[split]["bytes"] = path.stat().st_size  # the file is the split's UTF-8 text
        if split == "train":
            counts = np.bincount(tokens, minlength=vocab.size)[: vocab.size].astype(np.int64)
    buffer = io.BytesIO()
    np.save(buffer, counts)
    write_atomically(out / COUNTS_FILE, buffer.getvalue())

    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": source_name,
        "documents": documents,
        "seq_len": seq_len,
        "shard_size": shard_size,
        "sample_field": SAMPLE_FIELD,
        "dtype": "int32",
        "tokenizer": {
            "kind": tokenizer,
            "name": vocab.name,
            "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" else None,
            "file": TOKENIZER_FILE,
            "sha256": tokenizer_hash,
            "vocab_size": vocab.size,
            "bos_id": vocab.bos_id,
            "mask_id": vocab.mask_id,
        },
        "train_token_counts": {"file": COUNTS_FILE, "sha256": file_sha256(out / COUNTS_FILE)},
        "splits": splits,
    }
    write_atomically(out / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


def check_trainable(split_tokens: dict, files: dict, seq_len: int) -> None:
    """A DataError when the shards could not train or score: a train split without one whole
    sequence of `seq_len` tokens, or a valid or test split without a token."""
    train = len(split_tokens["train"])
    if train < seq_len:
        raise DataError(f"the train text ({files['train']}) is {train:,} tokens, fewer than one sequence of "
                        f"--seq-len {seq_len}: its shards would hold 0 sequences; give a smaller --seq-len or "
                        "more text")
    for split in ("valid", "test"):
        if split in split_tokens and len(split_tokens[split]) == 0:
            raise DataError(f"the {split} text ({files[split]}) holds no tokens: give it text to score")


def split_files(source: str, *, data_dir=None, cache_dir=None) -> tuple[dict[str, Path], str]:
    """The train/valid/test text files of `source`, and how the manifest names the source."""
    if source.startswith(HF_PREFIX):
        return hf_text_files(source[len(HF_PREFIX) :], cache_dir=cache_dir), source
    if source == "wikitext2":
        cfg = DataConfig(dataset="wikitext2", path=None if data_dir is None else str(data_dir))
        return find_split_files(cfg, cache_dir), source
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(
            f"source {source!r} is not a folder, 'wikitext2' or 'hf:NAME[:CONFIG]' "
            f"(a folder must hold {', '.join(TEXT_FILES.values())})"
        )
    return find_split_files(DataConfig(dataset="text", path=str(folder)), cache_dir), str(folder.resolve())


def source_vocab(kind: str, bpe_vocab_size: int, train_path: Path, *, data_dir=None, cache_dir=None) -> Vocab:
    """The vocabulary load_vocab would give: GPT-2's (from --data-dir first), or the BPE
    trained on this train file (shared with the text path's tokenizer cache)."""
    if kind == "bpe":
        return trained_bpe_vocab(train_path, bpe_vocab_size, cache_dir)
    cfg = DataConfig(dataset="wikitext2", path=None if data_dir is None else str(data_dir))
    return vocab_from_tokenizer(gpt2_tokenizer(*find_gpt2_files(cfg, cache_dir)), "gpt2")


class OutFolderError(TdlmError, FileExistsError):
    """--out cannot take the shards: a file, a folder that is not empty (without --force), or one
    holding files a prepare does not write."""


def claim_folder(out: Path, *, force: bool) -> None:
    """Make `out` ready to write: refuse a non-empty folder unless `force`, and even then touch
    only files a prepare wrote (anything else means the wrong folder was named)."""
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"{out} exists and is not a folder")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not force:
        raise OutFolderError(f"{out} is not empty: choose another --out, or pass --force to replace the shards in it")
    foreign = [name for name in existing if not OWN_FILE.fullmatch(name)]
    if foreign:
        raise OutFolderError(
            f"{out} holds files that `tdlm data prepare` does not write ({', '.join(foreign[:5])}): "
            "not replacing anything there; choose another --out"
        )
    # The manifest goes first, so a prepare cut short leaves a folder no reader accepts.
    for name in sorted(existing, key=lambda n: n != MANIFEST_FILE):
        (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_split(out: Path, split: str, tokens: np.ndarray, seq_len: int, shard_size: int, *, progress=True) -> dict:
    """Pack one split's stream into sequences and write them as shards; its manifest entry."""
    import webdataset  # ~2 s to import: only when writing

    sequences, tail = pack(tokens, seq_len)
    rows = sequences.numpy().astype(np.int32)
    shards = []
    with tqdm(total=len(rows), unit="seq", desc=f"writing {split} shards", disable=not progress) as bar:
        for index, start in enumerate(range(0, len(rows), shard_size)):
            path = out / shard_name(split, index)
            stop = min(start + shard_size, len(rows))
            # mtime=0: the same sequences give the same bytes, so sha256s are reproducible.
            with webdataset.TarWriter(str(path), mtime=0) as writer:
                for row in range(start, stop):
                    writer.write({"__key__": f"{split}-{row:09d}", SAMPLE_FIELD: rows[row]})
            shards.append({"file": path.name, "sequences": stop - start, "sha256": file_sha256(path)})
            bar.update(stop - start)
    return {
        "tokens": len(tokens),
        "sequences": len(rows),
        "tail": [] if tail is None else tail.tolist(),
        "shards": shards,
    }


def held_out_file(source: str, *, data_dir=None, cache_dir=None) -> Path:
    """The text file `tdlm eval --data SOURCE` scores: a folder's test.txt, WikiText-2's test
    split, or a split of a Hugging Face dataset (`hf:NAME[:CONFIG][:SPLIT]`, default test)."""
    if source.startswith(HF_PREFIX):
        name, config, split = (source[len(HF_PREFIX):].split(":") + ["", ""])[:3]
        split = {"validation": "valid"}.get(split, split) or "test"
        if split not in HF_SPLITS:
            raise DataNotFoundError(f"{source}: the split must be one of {', '.join(HF_SPLITS)} (got {split!r})")
        return hf_text_files(f"{name}:{config}" if config else name, cache_dir=cache_dir)[split]
    if source == "wikitext2":
        return split_files(source, data_dir=data_dir, cache_dir=cache_dir)[0]["test"]
    folder = Path(source).expanduser()
    if not (folder / TEXT_FILES["test"]).is_file():
        raise DataNotFoundError(
            f"--data {source}: expected a folder holding {TEXT_FILES['test']}, 'wikitext2' or "
            "'hf:NAME[:CONFIG][:SPLIT]' (to score one file, use --text FILE)"
        )
    return folder / TEXT_FILES["test"]


def hf_text_files(spec: str, *, cache_dir=None) -> dict[str, Path]:
    """Load a Hugging Face dataset ("NAME" or "NAME:CONFIG") and write its splits as text files."""
    name, _, config = spec.partition(":")
    label = f"{name!r}" + (f" (config {config!r})" if config else "")
    try:
        import datasets  # slow to import; only hf: sources need it

        dataset = datasets.load_dataset(name, config or None)
    except Exception as exc:  # noqa: BLE001 - any failure to load becomes the one clear line below
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise DataNotFoundError(
            f"could not load the Hugging Face dataset {label}: {type(exc).__name__}: {detail} "
            "(hf: sources need the hub online, or a datasets cache that already holds the dataset)"
        ) from exc
    folder = cache_root(cache_dir) / "hf-text" / re.sub(r"[^A-Za-z0-9._-]+", "__", spec)
    files = {}
    for split, candidates in HF_SPLITS.items():
        found = next((c for c in candidates if c in dataset), None)
        if found is None:
            raise DataNotFoundError(
                f"the Hugging Face dataset {label} has splits {sorted(dataset)}; tdlm needs "
                f"{' / '.join(candidates)} for its {split} split"
            )
        if "text" not in dataset[found].column_names:
            raise DataNotFoundError(
                f"the Hugging Face dataset {label} has no 'text' column in {found} "
                f"(columns: {dataset[found].column_names})"
            )
        rows = (row or "" for row in dataset[found]["text"])
        text = "".join(row if row.endswith("\n") else row + "\n" for row in rows)
        files[split] = folder / TEXT_FILES[split]
        write_atomically(files[split], text.encode("utf-8"))
    return files
