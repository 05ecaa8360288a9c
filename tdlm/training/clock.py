"""Where a run's time goes: the one clock of a training session (summary.json's figures).

Two kinds of figures. This session's seconds by phase (summary.json "timing"): the start-up
(imports, data and tokenizer cache, model build, up to the first step), the first step alone
(torch.compile's tracing lands there), the periodic evaluations with their samples, checkpoint
saves, the final scoring, and the whole command so far. And totals over every session of the
run, kept in the checkpoints (tdlm.training.checkpoint_state): training seconds and the steps
they took (no evaluation, no saving: for tokens/s and MFU), wall seconds and sessions.

Training time is measured in log windows: a window runs from the end of the last log, eval or
save to the next one (`pause`), so it holds the steps and the loop's own work between them only.
All times are time.perf_counter() seconds.
"""

from __future__ import annotations

import contextlib
import time

PHASES = ("eval_s", "save_s", "final_scoring_s")


class SessionClock:
    def __init__(self, command_started: float | None = None):
        # when the command began, so that the start-up counts its imports and the recipe's checks
        self.command_started = time.perf_counter() if command_started is None else command_started
        self.loop_started: float | None = None
        self.phases = dict.fromkeys(PHASES, 0.0)  # first_step_s joins them after the first step
        # the run's totals over earlier sessions and this one's closed windows (continue_run)
        self.train_seconds, self.timed_steps, self.wall_before, self.sessions = 0.0, 0, 0.0, 1
        self.window_seconds = 0.0  # training seconds of the open log window
        self._window_start: float | None = None

    def continue_run(self, state) -> None:
        """Take the totals a checkpoint kept (a TrainingState): this is the run's next session."""
        self.train_seconds, self.timed_steps = state.train_seconds, state.timed_steps
        self.wall_before, self.sessions = state.wall_seconds, state.sessions + 1
        if state.window is not None:  # the window a stop between log steps left open
            self.window_seconds = state.window.seconds

    def start_loop(self) -> None:
        """The loop begins: the start-up ends, the wall time and the first window start."""
        self.loop_started = self._window_start = time.perf_counter()

    @contextlib.contextmanager
    def step(self):
        """Time one step: the session's first one is first_step_s."""
        began = time.perf_counter()
        yield
        self.phases.setdefault("first_step_s", time.perf_counter() - began)

    @contextlib.contextmanager
    def paused(self):
        """The log window's training time stops here and starts again on leaving (logging,
        evaluating and saving are not training)."""
        self.window_seconds += time.perf_counter() - self._window_start
        try:
            yield
        finally:
            self._window_start = time.perf_counter()

    def close_window(self, steps: int) -> float:
        """Add the window (of `steps` steps) to the run's training totals; its seconds."""
        seconds, self.window_seconds = self.window_seconds, 0.0
        self.train_seconds += seconds
        self.timed_steps += steps
        return seconds

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the seconds of the block to phase `name` (one of PHASES)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - began

    def training_time(self, open_steps: int) -> tuple[float, int]:
        """(seconds, steps) of training over every session, the open window's included."""
        return self.train_seconds + self.window_seconds, self.timed_steps + open_steps

    def wall_seconds(self) -> float:
        """Wall time of the run's sessions: each from the start of its loop to its last
        checkpoint (what a checkpoint records), this one to now."""
        return self.wall_before + time.perf_counter() - self.loop_started

    def timing(self) -> dict:
        """summary.json's "timing": this session's seconds by phase, and the whole command."""
        now = time.perf_counter()
        return {"startup_s": self.loop_started - self.command_started, **self.phases,
                "command_s": now - self.command_started}
