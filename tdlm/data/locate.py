"""Where the data and the caches live, and one clear error when the data is nowhere.

Search order for the data dir (it holds wikitext-2/ and gpt2/, see /work/shared/data/README.md):
`data.path` if set, else $TDLM_DATA_DIR, else `<repo>/../shared/data`, else `./../shared/data`.
An explicit choice (data.path or $TDLM_DATA_DIR) is the only local place looked at, so a typo
is reported rather than papered over by some other copy. Files missing locally are fetched
from the Hugging Face hub when it can be reached and kept under `<cache>/hub` in the same
layout, so later runs work offline.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from tdlm.data.config import DataConfig
from tdlm.errors import DataError, TdlmError
from tdlm.files import write_atomically

SPLITS = ("train", "valid", "test")
WIKITEXT2_FILES = {split: f"wikitext-2/wiki.{split}.tokens" for split in SPLITS}
TEXT_FILES = {split: f"{split}.txt" for split in SPLITS}
GPT2_FILES = {"vocab": "gpt2/vocab.json", "merges": "gpt2/merges.txt"}
HUB_PROBE_TIMEOUT_S = 3.0


class DataNotFoundError(FileNotFoundError, TdlmError):
    """The data (or tokenizer) files are not on disk and could not be fetched; the message lists
    every path looked at and how to fix it."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $TDLM_CACHE_DIR, else ~/.cache/tdlm; a DataError when that path (or a
    folder above it) is a file."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("TDLM_CACHE_DIR") or "~/.cache/tdlm"
    root = Path(chosen).expanduser()
    blocker = file_in_the_way(root)
    if blocker is not None:
        where = "$TDLM_CACHE_DIR" if cache_dir is None and os.environ.get("TDLM_CACHE_DIR") else "the cache folder"
        raise DataError(f"{where} {root} cannot be a folder: {blocker} {not_a_folder(blocker)}; set TDLM_CACHE_DIR to a folder "
                        "(default ~/.cache/tdlm)")
    return root


def file_in_the_way(folder: Path) -> Path | None:
    """`folder` or the nearest existing folder above it, when that is not a folder (a file, or a
    symbolic link to nothing: so `folder` cannot be created); else None."""
    path = Path(folder).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def not_a_folder(path: Path) -> str:
    """What `path` is, when it is not a folder: for messages such as f"{path} {not_a_folder(path)}"."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return "does not exist"
    return "is a file, not a folder" if path.is_file() else "is not a folder"


def data_dir_candidates(path: str | None = None) -> list[Path]:
    """Local data dirs to look in, in order (see the module docstring)."""
    if path is not None:
        return [Path(path).expanduser()]
    if os.environ.get("TDLM_DATA_DIR"):
        return [Path(os.environ["TDLM_DATA_DIR"]).expanduser()]
    repo = Path(__file__).resolve().parent.parent.parent  # tdlm/data/locate.py -> repo root
    candidates = []
    for directory in (repo / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if directory.resolve() not in [c.resolve() for c in candidates]:
            candidates.append(directory)
    return candidates


def find_split_files(cfg: DataConfig, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the train/valid/test text files of `cfg.dataset`."""
    if cfg.dataset == "text":
        folder = Path(cfg.path).expanduser()
        found, looked = _first_complete([folder], TEXT_FILES)
        if found is None:
            raise DataNotFoundError(
                _not_found_message(
                    "the text dataset", looked, hub_note=None,
                    fix=f"set data.path to a folder holding {', '.join(TEXT_FILES.values())} (now {folder})",
                )
            )
        return found
    return _find_or_download(
        "WikiText-2", WIKITEXT2_FILES, data_dir_candidates(cfg.path), cache_root(cache_dir),
        download=_download_wikitext2, offline_vars=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
    )


def find_gpt2_files(cfg: DataConfig, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of the GPT-2 tokenizer."""
    # For dataset='text', data.path is the text folder, not a data dir.
    data_path = cfg.path if cfg.dataset == "wikitext2" else None
    files = _find_or_download(
        "the GPT-2 tokenizer", GPT2_FILES, data_dir_candidates(data_path), cache_root(cache_dir),
        download=_download_gpt2, offline_vars=("HF_HUB_OFFLINE",),
    )
    return files["vocab"], files["merges"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_complete(dirs: list[Path], files: dict[str, str]) -> tuple[dict[str, Path] | None, list[Path]]:
    """The files under the first dir that has all of them, and every path looked at."""
    looked = []
    for directory in dirs:
        paths = {key: directory / relative for key, relative in files.items()}
        looked.extend(paths.values())
        if all(p.is_file() for p in paths.values()):
            return paths, looked
    return None, looked


def _find_or_download(what, files, local_dirs, cache, *, download, offline_vars) -> dict[str, Path]:
    hub_dir = cache / "hub"
    found, looked = _first_complete([*local_dirs, hub_dir], files)
    if found is not None:
        return found
    hub_note = _hub_skip_reason(offline_vars)
    if hub_note is None:
        try:
            download(hub_dir)
            found, _ = _first_complete([hub_dir], files)
            hub_note = "downloaded, but the expected files are not there" if found is None else None
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes the one error below
            hub_note = f"failed: {type(exc).__name__}: {exc}"
        if found is not None:
            return found
    fix = (
        "set TDLM_DATA_DIR (or data.path in the recipe) to a folder holding "
        f"{', '.join(WIKITEXT2_FILES.values())}, {', '.join(GPT2_FILES.values())} "
        f"(such as the project's ../shared/data), or run once online so the hub copy is kept in {hub_dir}"
    )
    raise DataNotFoundError(_not_found_message(what, looked, hub_note, fix))


def _not_found_message(what: str, looked: list[Path], hub_note: str | None, fix: str) -> str:
    lines = [f"{what} not found. Looked at:"]
    lines += [f"  {p} ({'found' if p.is_file() else 'missing'})" for p in looked]
    if hub_note is not None:
        lines.append(f"Hugging Face hub: {hub_note}")
    lines.append(f"Fix: {fix}")
    return "\n".join(lines)


def _hub_skip_reason(offline_vars: tuple[str, ...]) -> str | None:
    """Why the hub is not tried, or None. A quick connection probe first, because the hub
    clients retry for tens of seconds on a machine without network before giving up."""
    for var in offline_vars:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"skipped ({var}={os.environ[var]})"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the hub may be reachable only through the proxy: let the client try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"skipped ({host}:{port} unreachable: {exc})"
    return None


def _download_wikitext2(hub_dir: Path) -> None:
    import datasets  # slow to import; only needed here

    dataset = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-v1")
    for split, hub_split in zip(SPLITS, ("train", "validation", "test")):
        # Hub rows are the file's lines with their "\n", except that the blank lines (" \n" in
        # the original files) became "" rows: restore them so the text and its tokens match.
        text = "".join(row or " \n" for row in dataset[hub_split]["text"])
        write_atomically(hub_dir / WIKITEXT2_FILES[split], text.encode("utf-8"))


def _download_gpt2(hub_dir: Path) -> None:
    from tokenizers import Tokenizer

    model = Tokenizer.from_pretrained("gpt2").model
    with tempfile.TemporaryDirectory() as tmp:
        for saved in model.save(tmp):  # the BPE model saves vocab.json and merges.txt
            write_atomically(hub_dir / "gpt2" / Path(saved).name, Path(saved).read_bytes())
