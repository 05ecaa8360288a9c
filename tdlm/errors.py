"""The one base class of the errors a user can fix.

A TdlmError's message is complete on one line (what is wrong, and what to do): the command line
prints it on stderr and exits with code 2, never with a traceback (tdlm.cli catches it once).
"""

from __future__ import annotations


class TdlmError(Exception):
    """A problem with what the user asked for: a recipe, a run directory, a command-line value."""


class RunError(TdlmError):
    """A run directory that cannot be used as asked: in use by another process, a resume that
    would train something else than the saved run, a --stop-at the run cannot honour."""
