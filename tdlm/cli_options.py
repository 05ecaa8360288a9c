"""The checks of the command-line values several `tdlm` commands take: --device, --seed and
--option KEY=VALUE. Each gives the value to use, or raises a one-line UsageError (the command
line prints it and exits with code 2). tdlm/cli.py and the commands in their own modules
(tdlm/studies/harness_cli.py) import them from here, so no command module imports another."""

from __future__ import annotations

from tdlm.errors import UsageError


def default_device() -> str:
    """cuda if a CUDA GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """--device checked against this machine (default: cuda if available, else cpu)."""
    import torch

    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = "a torch built without CUDA" if torch.version.cuda is None else "no CUDA GPU visible"
            raise UsageError(f"--device {device}: this machine has {built}; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device}: tdlm runs on cpu, cuda or mps")
    return device


def check_seed(seed: int) -> int:
    """A seed every generator tdlm seeds accepts."""
    from tdlm.config import SEED_LIMIT

    if not -SEED_LIMIT <= seed < SEED_LIMIT:
        raise UsageError(f"--seed {seed}: a seed must lie in [-2**40, 2**40)")
    return seed


def sampler_options(options: tuple[str, ...]) -> dict:
    """--option KEY=VALUE pairs as a (nested) dict; values are TOML, dotted keys nest."""
    from tdlm.config import RecipeError, apply_overrides

    for text in options:
        if "=" not in text:
            raise UsageError(f"--option {text!r} is not of the form key=value")
    try:
        return apply_overrides({}, list(options))
    except RecipeError as exc:  # the same error, said to be about --option
        raise UsageError(f"--option: {exc}") from None
