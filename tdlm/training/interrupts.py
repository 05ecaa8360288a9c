"""What SIGINT (Ctrl-C) and SIGTERM do to a training run: stop it without ever losing a checkpoint.

While the run sets up, a signal stops it at once: nothing is being trained, and what set-up
writes is replaced atomically (tdlm.files). Once it trains:
- the first signal asks for a clean stop: the loop finishes its step, saves a checkpoint, stops;
- a second one stops at once, with no new checkpoint, unless a checkpoint is being written:
  that write is finished first (a save is never cut by a second signal), then the run stops
  there as after a first one (`urgent` tells the loop);
- a third one during that write drops it (the save's cleanup removes its partial files; `last`
  still names the complete checkpoint before it) and stops at once;
- later ones are ignored, so that the cleanup after a stop is never cut short.
A stop "at once" raises RunInterrupted (a KeyboardInterrupt) from the handler; the trainer adds
where the run stands and the command line prints that one line (exit code 128 + the signal).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable

from tdlm.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT/SIGTERM handlers of one training process (install, then restore when it ends)."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.count, self.training, self.saving_step, self.stopping = echo, 0, False, None, False
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        """Whether a clean stop was asked for (a first signal)."""
        return self.count > 0

    @property
    def urgent(self) -> bool:
        """Whether a second signal came while a checkpoint was written: stop right after it."""
        return self.count >= 2

    def install(self) -> None:
        for sig in SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def start_training(self) -> None:
        """From here on a first signal asks for a clean stop (before, it stops at once)."""
        self.training = True

    @contextlib.contextmanager
    def saving(self, step: int):
        """A checkpoint write: a second signal waits for its end (then `urgent` says to stop)."""
        self.saving_step = step
        try:
            yield
        finally:
            self.saving_step = None

    def _handle(self, signum, frame) -> None:
        if self.stopping:  # stopping already: let the cleanup finish
            return
        self.count += 1
        name = signal.Signals(signum).name
        if not self.training:
            self._stop(signum, f"{name} received while the run was setting up: stopped before training")
        if self.count == 1:
            self.echo(f"tdlm: {name} received; saving a checkpoint after this step, then stopping (send it again to "
                      "stop at once without saving this step)")
        elif self.saving_step is None:
            self._stop(signum, f"{name} received again: stopped at once, without saving the steps since the last "
                               "checkpoint")
        elif self.count == 2:
            self.echo(f"tdlm: {name} received again; finishing the checkpoint of step {self.saving_step} being "
                      "written, then stopping (a third one drops that checkpoint and stops at once)")
        else:
            self._stop(signum, f"{name} received a third time: stopped at once while the checkpoint of step "
                               f"{self.saving_step} was being written")

    def _stop(self, signum: int, what: str) -> None:
        self.stopping = True
        raise RunInterrupted(what, signum)
