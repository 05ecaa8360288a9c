"""The one base class of the errors a user can fix.

A TdlmError's message is complete on one line (what is wrong, and what to do): the command line
prints it on stderr and exits with code 2, never with a traceback (tdlm.cli catches it once).
"""

from __future__ import annotations


class TdlmError(Exception):
    """A problem with what the user asked for: a recipe, a run directory, a command-line value."""


class PluginError(TdlmError):
    """A plugin could not be loaded or registered something invalid (tdlm.registry): a duplicate
    name, a component without a Config, a hook that raised."""


class ComponentRefused(PluginError):
    """A registered component class does not fit this tdlm's plugin API (tdlm.components.fit): not
    a subclass of its kind's base class, a declared attribute of the wrong type, a method whose
    signature is not the base class's. The message names what changed and the section of
    docs/plugins.md that says how to update."""


class RunError(TdlmError):
    """A run directory that cannot be used as asked: in use by another process, a resume that
    would train something else than the saved run, a --stop-at the run cannot honour."""


class DataError(TdlmError, ValueError):
    """Data that cannot train or score as asked: too few tokens for one batch or sequence, an
    empty split, a data file that is not UTF-8 text, a cache path that is not a folder."""


class DataChangedError(RunError):
    """The data or the tokenizer a run was trained with changed since (data.json records them):
    scoring or sampling would use token ids the model never saw."""


class CheckpointError(TdlmError):
    """A checkpoint that cannot be read (truncated, corrupt) or written (no space left)."""


class WriteError(TdlmError, OSError):
    """A file could not be written (no space left, over quota, a read-only folder, no permission):
    the file as it was is kept, and no partial file is left (tdlm.files). `what` and `fix` are
    the message's two halves, for callers that say more about what the failure means."""

    def __init__(self, message: str, *, path=None, what: str = "", fix: str = "", errno: int | None = None):
        super().__init__(message)
        self.path, self.what, self.fix, self.errno = path, what or message, fix, errno


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint of that name: the message lists the ones the run has."""


class UsageError(TdlmError):
    """A command-line value that cannot be used as given (a --device this machine lacks, a seed
    out of range, options that exclude each other)."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped at once by SIGINT or SIGTERM, its checkpoints whole (tdlm.training.interrupts).
    The command line prints the message and exits with 128 + the signal's number, as a shell does."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: the run stops and keeps its last good
    checkpoint (not a user's mistake: exit code 1, with the advice in the message)."""
