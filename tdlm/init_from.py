"""`training.init_from`: start a run from another model's weights.

A source is one of two folders:

- a run directory (`config.json`, `data.json`, `checkpoints/`): its `best` checkpoint, or the one
  `DIR@last` / `DIR@STEP` names;
- a folder `tdlm export` wrote (`tdlm.export.is_export`), read with `tdlm.export.read_folder`, the
  one reader of that layout: its recipe, its `state_dict` (tdlm's own names), its data record, and
  the checkpoint it was exported from (name and step).

Only the network's tensors (`net.*`) are taken; the optimizer, the step, the learning-rate schedule
and any learned component state start fresh. The source must have this recipe's shapes and
tokenizer (checked here, each problem in one line). The trainer records the resolved source in
config.json (`resolved_spec`) and its identity in data.json (`Source.identity`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tdlm.errors import TdlmError
from tdlm.export.folder import RUN_FILE, ExportError, is_export, read_folder

POINTERS = ("best", "last")
# Network settings that change what the weights compute without changing a tensor's shape.
SAME_FUNCTION = ("n_heads", "positions", "norm", "mlp", "tied_embeddings")
# Every setting of the network's architecture: `tdlm run --check` compares them all, before any weight is read.
ARCHITECTURE = ("n_layers", "d_model", "d_ff", "bias", *SAME_FUNCTION)


class InitFromError(TdlmError):
    """A `training.init_from` source that cannot start this run: missing, unreadable, or another
    shape or tokenizer."""


def split_spec(spec: str) -> tuple[str, str | None]:
    """'DIR@last' -> ('DIR', 'last'); 'DIR@300' -> ('DIR', '300'); 'DIR' -> ('DIR', None). An '@'
    followed by anything else is part of the path."""
    path, sep, which = spec.rpartition("@")
    if sep and path and (which in POINTERS or which.isdigit()):
        return path, str(int(which)) if which.isdigit() else which
    return spec, None


def resolved_spec(spec: str) -> str:
    """The spec as config.json records it: an absolute path (made from the text alone, so a resume
    resolves the recipe's value to the same string), and the checkpoint when it is not the default."""
    path, which = split_spec(spec)
    absolute = os.path.abspath(os.path.expanduser(path))
    return absolute if which in (None, "best") else f"{absolute}@{which}"


@dataclass
class Source:
    path: Path
    kind: str  # "run" or "export"
    config: dict  # the source's resolved recipe
    record: dict | None  # its data.json (None: a run from before records)
    checkpoint: Path  # the folder model.safetensors is read from
    step: int | None  # the training step of those weights, when known
    checkpoint_name: str | None = None  # the run's checkpoint (step-N) of those weights, when known
    tensors: dict | None = None  # an export's state_dict, read with its recipe; a run's is read by weights()

    def weights(self) -> dict:
        """The network's tensors, keyed as `LanguageModel.state_dict()` names them (`net.*`)."""
        from tdlm.training import checkpointer as ckpt

        tensors = self.tensors
        if tensors is None:
            try:
                tensors = ckpt.read_weights(self.checkpoint)
            except (FileNotFoundError, TdlmError) as exc:
                raise InitFromError(f"training.init_from {self.path}: {exc}") from None
        if not any(key.startswith("net.") for key in tensors):  # a bare Transformer's state_dict
            tensors = {f"net.{key}": value for key, value in tensors.items()}
        return {key: value for key, value in tensors.items() if key.startswith("net.")}

    def identity(self) -> dict:
        """What data.json records of the source."""
        record = self.record or {}
        return {"path": str(self.path), "kind": self.kind, "checkpoint": self.checkpoint_name, "step": self.step,
                "objective": (self.config.get("objective") or {}).get("name"),
                "tokenizer": record.get("tokenizer"),
                "splits": {split: {k: v for k, v in entry.items() if k in ("tokens", "tokens_sha256", "text_sha256",
                                                                             "shards_sha256")}
                           for split, entry in (record.get("splits") or {}).items()}}


def open_source(spec: str) -> Source:
    """The source a `training.init_from` value names, its weights not read yet."""
    path, which = split_spec(spec)
    folder = Path(os.path.expanduser(path)).absolute()
    if not folder.is_dir():
        raise InitFromError(f"training.init_from {spec!r}: no such folder (give a run directory, e.g. "
                            "runs/quick_wikitext2_ar, or a folder tdlm export wrote)")
    if is_export(folder):
        if which is not None:
            raise InitFromError(f"training.init_from {spec!r}: {folder} is an exported model, which holds one set of "
                                f"weights; drop '@{which}'")
        return read_export(folder)
    if (folder / "config.json").is_file():
        return read_run(folder, which or "best")
    raise InitFromError(f"training.init_from {spec!r}: {folder} is neither a run directory (no config.json) nor an "
                        f"exported model (no {RUN_FILE})")


def read_run(folder: Path, which: str) -> Source:
    from tdlm.data.record import read_record
    from tdlm.training import checkpointer as ckpt

    try:
        checkpoint = ckpt.checkpoint_dir(folder, which)
    except TdlmError as exc:
        raise InitFromError(f"training.init_from {folder}@{which}: {exc}") from None
    step = int(checkpoint.name[5:]) if checkpoint.name[5:].isdigit() else None
    return Source(folder, "run", _json(folder / "config.json"), read_record(folder), checkpoint, step, checkpoint.name)


def read_export(folder: Path) -> Source:
    """A folder `tdlm export` wrote, through tdlm.export.read_folder; the step and checkpoint name
    are those of the run's checkpoint it was exported from."""
    try:
        recipe, state_dict, data, info = read_folder(folder)
    except ExportError as exc:
        raise InitFromError(f"training.init_from: {exc}") from None
    checkpoint = info.get("checkpoint") or {}
    step, name = checkpoint.get("step"), checkpoint.get("name")
    return Source(folder, "export", recipe, data if isinstance(data, dict) else None, folder,
                  step if isinstance(step, int) else None, name if isinstance(name, str) else None, state_dict)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InitFromError(f"training.init_from: {path} cannot be read ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InitFromError(f"training.init_from: {path} is not a JSON table")
    return data


# -- checks -------------------------------------------------------------------------------------
def _tokenizer_words(tokenizer: dict | None) -> str:
    tokenizer = tokenizer or {}
    size = tokenizer.get("size")
    return f"{tokenizer.get('name', '?')}, {size:,} tokens" if isinstance(size, int) else str(tokenizer.get("name", "?"))


def _refuse_tokenizer(source: Source, theirs: dict | None, ours: dict | None) -> InitFromError:
    return InitFromError(
        f"training.init_from {source.path}: its tokenizer ({_tokenizer_words(theirs)}) is not this recipe's "
        f"({_tokenizer_words(ours)}), so its embeddings would read other tokens; use the source's tokenizer settings "
        "(data.tokenizer, data.bpe_vocab_size; a 'bpe' tokenizer is trained on data's train text, so another text "
        "gives another one: use 'gpt2' to fine-tune on other text) or train from scratch")


def check_tokenizer(source: Source, record: dict) -> None:
    """Refuse a source whose tokenizer is not the one in `record` (this run's data.json): the
    token -> id table's hash where both have it, else the vocabulary size."""
    theirs, ours = (source.record or {}).get("tokenizer") or {}, record.get("tokenizer") or {}
    if theirs.get("vocab_sha256") and ours.get("vocab_sha256"):
        same = theirs["vocab_sha256"] == ours["vocab_sha256"]
    else:
        same = theirs.get("size", ours.get("size")) == ours.get("size")
    if not same:
        raise _refuse_tokenizer(source, theirs, ours)


def check_tokenizer_name(source: Source, name: str | None, size: int | None) -> None:
    """The cheap check of `tdlm run --check`, before any tokenizer is loaded or trained: the
    tokenizer this recipe would get, by name (None: not known without loading it), against the
    source's. Names can differ for one vocabulary only across `tokenizers` versions (a BPE is
    cached under a name that includes it); those are left to the hash check at start."""
    theirs = (source.record or {}).get("tokenizer") or {}
    if name is None or not theirs.get("name") or theirs["name"] == name:
        return
    import tokenizers

    other_version = theirs.get("tokenizers") not in (None, tokenizers.__version__)
    if other_version and theirs["name"].split("-")[0] == name.split("-")[0]:
        return
    raise _refuse_tokenizer(source, theirs, {"name": name, "size": size})


def check_network(source: Source, model_config: dict, keys: tuple[str, ...] = SAME_FUNCTION) -> None:
    """Refuse a source whose network settings `keys` differ from `model_config`'s (by default those
    that compute another function with the same tensor shapes: heads, norm, MLP, positions; the
    shapes themselves are checked tensor by tensor in `load_into`): one line naming each setting."""
    theirs = source.config.get("model") or {}
    differ = [f"model.{key} is {theirs[key]!r} there and {model_config.get(key)!r} here"
              for key in keys if key in theirs and theirs[key] != model_config.get(key)]
    if differ:
        raise InitFromError(f"training.init_from {source.path}: {'; '.join(differ)}: its weights do not fit or would "
                            "compute something else here; use the source's [model] settings")


def load_into(model, source: Source) -> None:
    """Copy the source's network weights into `model` (a LanguageModel); every tensor of the
    network must be there with the same shape (one line naming each one that is not)."""
    import torch

    from tdlm.training import checkpointer as ckpt

    weights = source.weights()
    own = {key: value for key, value in model.state_dict().items() if key.startswith("net.")}
    found = ckpt.compare_state(weights, own)
    problems = [f"{key} is {theirs} there and {ours} here" for key, theirs, ours in found.shapes]
    missing, extra = found.missing, found.extra
    if missing:
        problems.append(f"it lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"it has {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''} that this model has not")
    if problems:
        shown = problems[:4] + ([f"{len(problems) - 4} more"] if len(problems) > 4 else [])
        raise InitFromError(f"training.init_from {source.path}: the network does not fit this recipe's: "
                            f"{'; '.join(shown)}; use the source's [model] settings and tokenizer")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(weights[key].to(value.dtype))


# -- what the trainer and `tdlm run --check` call ---------------------------------------------------
def with_resolved_source(cfg):
    """`cfg` (a RunConfig) with training.init_from resolved (`resolved_spec`), as config.json saves it."""
    spec = cfg.training.init_from
    if spec is None or resolved_spec(spec) == spec:
        return cfg
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"init_from": resolved_spec(spec)})})


def check_before_start(cfg) -> Source | None:
    """`tdlm run --check`: the source opens, its network settings are this recipe's, and so is its
    tokenizer as far as it is known without loading one (its name). The source, or None."""
    if cfg.training.init_from is None:
        return None
    source = open_source(cfg.training.init_from)
    check_network(source, cfg.model.model_dump(mode="json"), ARCHITECTURE)
    if cfg.data.format != "webdataset":  # shards name their tokenizer in a manifest: checked at start
        from tdlm.data.locate import DataNotFoundError
        from tdlm.data.tokenizer import tokenizer_name

        try:
            name = tokenizer_name(cfg.data)
        except (DataNotFoundError, TdlmError):  # data not found: the run's own start says so
            name = None
        size = cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else None
        check_tokenizer_name(source, name, size)
    return source


def start_from(model, cfg, record: dict) -> Source:
    """Load the source of cfg.training.init_from into `model` (a LanguageModel), once checked that
    its tokenizer is `record`'s (this run's data.json) and its network this recipe's; its identity
    goes into `record`."""
    source = open_source(cfg.training.init_from)
    check_tokenizer(source, record)
    check_network(source, cfg.model.model_dump(mode="json"))
    load_into(model, source)
    record["init_from"] = source.identity()
    return source
