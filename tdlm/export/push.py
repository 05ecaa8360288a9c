"""Uploading an exported folder to the Hugging Face Hub (`tdlm export --push REPO`)."""

from __future__ import annotations

import re
from pathlib import Path

from tdlm.export.folder import ExportError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_repo(repo: str) -> None:
    """Refuse, before any work, a repository name the Hub would refuse, or a missing client."""
    if not REPO_ID.match(repo):
        raise ExportError(f"--push {repo!r}: a Hub repository is named OWNER/NAME, e.g. me/tiny-diffusion")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise ExportError("--push needs the huggingface_hub package: pip install huggingface_hub") from None


def push_folder(folder: str | Path, repo: str) -> str:
    """Create the model repository `repo` if needed and upload `folder`; the commit's URL."""
    from huggingface_hub import HfApi

    check_repo(repo)
    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                   commit_message="tdlm export")
    except Exception as exc:  # noqa: BLE001 - offline, no token, refused, network: all end the same way
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"wrote {folder}, but pushing it to {repo} failed ({type(exc).__name__}: {why}); "
                          f"check the network and your token (hf auth login), then: hf upload {repo} {folder}") from None
    return str(getattr(commit, "commit_url", commit))
