"""A prepared shard folder's manifest.json: reading and checking it, and what it fixes in a
recipe's [data] section. Only json here (no torch, no tokenizers): `tdlm run --check` and
the trainer read a manifest before anything heavy is imported. The layout: tdlm.data.shards.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tdlm.data.config import DataConfig
from tdlm.data.locate import DataNotFoundError

FORMAT_NAME = "tdlm-shards"
FORMAT_VERSION = 1  # bump when the layout changes; readers refuse other versions
MANIFEST_FILE = "manifest.json"

# The keys a reader needs, and their types (a nested dict: a table; a list of one dict: its rows).
_SHARD = {"file": str, "sequences": int, "sha256": str}
_SPLIT = {"tokens": int, "sequences": int, "tail": list, "shards": [_SHARD]}
REQUIRED = {
    "source": str, "seq_len": int, "shard_size": int,
    "tokenizer": {"kind": str, "name": str, "file": str, "sha256": str, "vocab_size": int, "bos_id": int,
                  "mask_id": int},
    "train_token_counts": {"file": str, "sha256": str},
    "splits": {"train": _SPLIT, "valid": _SPLIT, "test": _SPLIT},
}


class ShardError(DataNotFoundError):
    """A prepared folder that cannot be used as asked: a missing, truncated or corrupt file, or
    shards made for another seq_len. A DataNotFoundError, so the CLI reports it in one line."""


def prepare_again(manifest: dict, directory: Path) -> str:
    """The command that rebuilds `directory` as it was prepared (placeholders for what the
    manifest does not say)."""
    tokenizer = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    kind = tokenizer.get("kind", "gpt2")
    options = f"--tokenizer {kind}"
    if kind == "bpe":
        options += f" --bpe-vocab-size {tokenizer.get('bpe_vocab_size', 'N')}"
    if manifest.get("documents", "as-is") != "as-is":
        options += f" --documents {manifest['documents']}"
    source = manifest.get("source")
    return (
        f"tdlm data prepare {shlex.quote(source) if isinstance(source, str) else 'SOURCE'} "
        f"--out {shlex.quote(str(directory))} --seq-len {manifest.get('seq_len', 'L')} "
        f"--shard-size {manifest.get('shard_size', 'S')} {options} --force"
    )


def _missing(value, spec, where: str) -> list[str]:
    """Dotted names of the keys of `spec` that `value` lacks or holds with another type."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [where or "the top level"]
        return [m for key, sub in spec.items()
                for m in (_missing(value[key], sub, f"{where}.{key}" if where else key) if key in value
                          else [f"{where}.{key}" if where else key])]
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [where]
        return [m for i, row in enumerate(value) for m in _missing(row, spec[0], f"{where}[{i}]")]
    ok = isinstance(value, spec) and not (spec is int and isinstance(value, bool))
    return [] if ok else [where]


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a folder `tdlm data prepare` finished writing, checked for every key a
    reader uses."""
    directory = Path(directory).expanduser()
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ShardError(
            f"no {MANIFEST_FILE} in {directory}: not a prepared shard folder, or its preparation did not "
            f"finish; run `tdlm data prepare SOURCE --out {directory} --seq-len L --shard-size S` first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); prepare the folder again with --force") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        found = manifest if isinstance(manifest, dict) else {}
        raise ShardError(
            f"{path} is not a {FORMAT_NAME} manifest of version {FORMAT_VERSION} (found format "
            f"{found.get('format')!r}, version {found.get('version')!r}); prepare the folder again with --force"
        )
    missing = _missing(manifest, REQUIRED, "")
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ShardError(f"{path} lacks or mistypes {shown}: it was not written by `tdlm data prepare` as this "
                         f"tdlm reads it (or was edited); re-run `{prepare_again(manifest, directory)}`")
    return manifest


def manifest_data_settings(manifest: dict) -> dict:
    """The [data] settings a prepared folder fixes: its corpus kind, its tokenizer and how its
    documents are marked."""
    tokenizer = manifest["tokenizer"]
    bpe = tokenizer["kind"] == "bpe" and isinstance(tokenizer.get("bpe_vocab_size"), int)
    return {
        "dataset": "wikitext2" if manifest["source"] == "wikitext2" else "text",
        "tokenizer": tokenizer["kind"],
        "bpe_vocab_size": tokenizer["bpe_vocab_size"] if bpe else DataConfig.model_fields["bpe_vocab_size"].default,
        # Folders prepared before documents could be marked hold the text as it is.
        "documents": manifest.get("documents", "as-is"),
    }


def data_from_manifest(data: DataConfig, warn=None) -> DataConfig:
    """For format='webdataset', `data` with the corpus and tokenizer settings of its manifest
    (what the run really uses, so the saved config says so); other formats unchanged. `warn`
    gets a line for each recipe value (other than the default) that the manifest overrides."""
    if data.format != "webdataset":
        return data
    settings = manifest_data_settings(read_manifest(data.path))
    if warn is not None:
        for key, value in settings.items():
            given = getattr(data, key)
            if given != value and given != DataConfig.model_fields[key].default:
                warn(f"tdlm: data.{key} = {given!r} is not used: the shards in {data.path} were prepared with "
                     f"{key} {value!r} (a webdataset run takes its corpus and tokenizer from the manifest)")
    return DataConfig.model_validate({**data.model_dump(), **settings})
