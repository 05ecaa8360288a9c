"""What a run was trained on, as content hashes: `data.json` in its run directory.

Written when a run starts; checked by `tdlm eval`, `tdlm sample`, `tdlm gen-eval` and
`--resume`. A run directory holds a recipe, not its data: the text files and the tokenizer
(a GPT-2 file, a cached BPE that a `tokenizers` upgrade trains anew) are read again each time,
so a replaced file would make the model score or continue token ids it never saw. The record:

    {"version": 1, "format": "text" | "webdataset",
     "tokenizer": {"name": ..., "vocab_sha256": ..., "size": V, "tokenizers": "0.21.1"},
     "splits": {"train" | "valid" | "test": {
         "file": "/abs/valid.txt", "text_sha256": ...,       (format "text")
         "shards_sha256": ...,                                (format "webdataset": its manifest entry)
         "tokens": T, "tokens_sha256": ...}}}                 (the token ids, train cut as trained)

`vocab_sha256` hashes the token -> id table (not the tokenizer file, whose serialisation a
`tokenizers` upgrade may change alone); `tokens_sha256` hashes the ids each split tokenises
to, so a tokenizer that encodes differently with the same table is caught too. A run without
data.json (from before it existed) is not checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tdlm.data.config import DataConfig
from tdlm.errors import DataChangedError

RECORD_FILE = "data.json"
VERSION = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vocab_sha256(vocab) -> str:
    table = sorted(vocab.tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    return _sha256(json.dumps(table, ensure_ascii=False).encode("utf-8"))


def tokens_sha256(tokens) -> str:
    return _sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes())


def data_record(corpus, cfg: DataConfig, *, cache_dir=None) -> dict:
    """The record of `corpus`, loaded as `cfg` describes."""
    import tokenizers

    from tdlm.data.locate import file_sha256, find_split_files

    record = {"version": VERSION, "format": cfg.format,
              "tokenizer": {"name": corpus.vocab.name, "vocab_sha256": vocab_sha256(corpus.vocab),
                            "size": corpus.vocab.size, "tokenizers": tokenizers.__version__},
              "splits": {}}
    if cfg.format == "webdataset":
        from tdlm.data.manifest import read_manifest

        manifest = read_manifest(cfg.path)
        for split, entry in manifest["splits"].items():
            record["splits"][split] = {"shards_sha256": _sha256(json.dumps(entry, sort_keys=True).encode())}
    else:
        for split, path in find_split_files(cfg, cache_dir).items():
            record["splits"][split] = {"file": str(Path(path).resolve()), "text_sha256": file_sha256(path)}
    for split, tokens in corpus.splits.items():
        record["splits"].setdefault(split, {}).update(tokens=int(len(tokens)), tokens_sha256=tokens_sha256(tokens))
    return record


def write_record(run_dir: Path, record: dict) -> None:
    from tdlm.files import write_atomically

    write_atomically(Path(run_dir) / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def read_record(run_dir: Path) -> dict | None:
    """The run's record, or None for a run from before records (or a damaged record, with a warning)."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("splits"), dict):
            raise ValueError("not a data record")
        return record
    except (OSError, ValueError) as exc:
        import sys

        print(f"tdlm: warning: {path} cannot be read ({exc}); the run's data is not checked", file=sys.stderr)
        return None


def data_changes(recorded: dict, current: dict) -> list[str]:
    """What differs between a run's record and the data as it is now, in words."""
    changes, retokenised = [], []
    for split, before in recorded.get("splits", {}).items():
        now = current.get("splits", {}).get(split, {})
        for key, what in (("text_sha256", "text"), ("shards_sha256", "shards")):
            if before.get(key) and now.get(key) and before[key] != now[key]:
                where = f" ({now['file']})" if now.get("file") else ""
                changes.append(f"the {split} {what}{where} is not the one the run was trained with")
                break
        else:
            if before.get("tokens_sha256") and now.get("tokens_sha256") and before["tokens_sha256"] != now["tokens_sha256"]:
                retokenised.append(split)
    old, new = recorded.get("tokenizer", {}), current.get("tokenizer", {})
    vocab_changed = old.get("vocab_sha256") and new.get("vocab_sha256") and old["vocab_sha256"] != new["vocab_sha256"]
    if vocab_changed or retokenised:
        names = f"{old.get('name')} -> {new.get('name')}" if old.get("name") != new.get("name") else f"{new.get('name')}"
        what = "its vocabulary differs" if vocab_changed else f"the same text gives other ids ({', '.join(retokenised)})"
        versions = (f", tokenizers {old.get('tokenizers')} -> {new.get('tokenizers')}"
                    if old.get("tokenizers") != new.get("tokenizers") else "")
        changes.append(f"the tokenizer changed ({names}{versions}: {what})")
    return changes


def check_record(run_dir: Path, corpus, cfg: DataConfig, *, action: str, current: dict | None = None,
                 recorded: dict | None = None) -> None:
    """Raise DataChangedError, in one line, when the data or tokenizer differ from the record.
    `current`: data_record(corpus, cfg), when the caller has it already; `recorded`: the record
    when it is not run_dir's data.json (an exported folder keeps it in tdlm_run.json)."""
    where = "its data record" if recorded else Path(run_dir) / RECORD_FILE
    recorded = recorded or read_record(run_dir)
    if recorded is None:
        return
    changes = data_changes(recorded, current or data_record(corpus, cfg))
    if changes:
        versions = recorded.get("tokenizer", {}).get("tokenizers")
        raise DataChangedError(
            f"the data of run {run_dir} changed since it was trained: {'; '.join(changes)}. {action} would use token "
            f"ids the model never saw; restore the files it was trained with ({where} lists "
            f"their hashes{f'; tokenizers {versions}' if versions else ''}) or train a new run")
