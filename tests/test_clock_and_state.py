"""The trainer's session clock (tdlm.training.clock) and the typed checkpoint state
(tdlm.training.checkpoint_state): what each figure counts, and state.pt's format unchanged."""

from __future__ import annotations

import types

import pytest
import torch

from tdlm.training import clock as clock_module
from tdlm.training.checkpoint_state import OpenWindow, TrainingState
from tdlm.training.clock import SessionClock


@pytest.fixture
def now(monkeypatch):
    """A clock the test moves by hand: now.t seconds."""
    fake = types.SimpleNamespace(t=100.0)
    monkeypatch.setattr(clock_module, "time", types.SimpleNamespace(perf_counter=lambda: fake.t))
    return fake


def test_the_clock_counts_training_apart_from_logging_evaluating_and_saving(now):
    clock = SessionClock(command_started=90.0)
    clock.start_loop()  # t = 100: ten seconds of start-up
    for seconds in (3.0, 1.0):  # two steps, the first slower (compilation lands there)
        with clock.step():
            now.t += seconds
    with clock.paused():  # a log step with an evaluation and a save
        with clock.phase("eval_s"):
            now.t += 5.0
        with clock.phase("save_s"):
            now.t += 2.0
    assert clock.close_window(steps=2) == 4.0  # the steps only
    with clock.step():
        now.t += 1.0
    with clock.paused():  # a stop between log steps: it saves, and the window stays open
        now.t += 2.0
    assert clock.training_time(open_steps=1) == (5.0, 3)  # the open window counts too
    with clock.phase("final_scoring_s"):
        now.t += 6.0
    assert clock.wall_seconds() == 20.0
    assert clock.timing() == {"startup_s": 10.0, "eval_s": 5.0, "save_s": 2.0, "final_scoring_s": 6.0,
                              "first_step_s": 3.0, "command_s": 30.0}


def test_a_resumed_session_continues_the_run_s_totals(now):
    clock = SessionClock()
    clock.continue_run(TrainingState(step=4, best=2.5, rng={}, train_seconds=7.0, timed_steps=3, wall_seconds=20.0,
                                     sessions=2, window=OpenWindow(steps=1, seconds=0.5, loss_sum=3.0, stats={})))
    clock.start_loop()
    with clock.step():
        now.t += 1.0
    with clock.paused():
        pass
    assert clock.sessions == 3 and clock.close_window(steps=2) == 1.5
    assert (clock.train_seconds, clock.timed_steps, clock.wall_seconds()) == (8.5, 5, 21.0)


def old_trainer_state(**extra) -> dict:
    """state.pt's dict as the trainer wrote it before TrainingState (same keys, same order)."""
    state = {"step": 6, "best": 3.25, "rng": {"torch": torch.get_rng_state()}, "engine": "single", "processes": 1,
             "total_steps": 8, "window": {"steps": 2, "seconds": 0.75, "loss_sum": 7.5,
                                          "stats": {"bucket_loss": torch.ones(3)}},
             "train_seconds": 4.5, "timed_steps": 4, "wall_seconds": 9.0, "sessions": 1,
             "pointer_info": {"val_nll": 3.25}}
    return {**state, **extra}


def test_the_state_saves_the_same_dict_key_for_key():
    saved = old_trainer_state(optimizer={"state": {}, "param_groups": []})
    again = TrainingState.from_saved(saved).saved()
    assert list(again) == list(saved)
    assert again["window"]["stats"]["bucket_loss"] is saved["window"]["stats"]["bucket_loss"]
    assert {k: v for k, v in again.items() if k not in ("rng", "window")} == \
        {k: v for k, v in saved.items() if k not in ("rng", "window")}
    sharded = TrainingState.from_saved(old_trainer_state(engine="deepspeed-zero2", window=None))
    assert sharded.sharded and "optimizer" not in sharded.saved() and sharded.saved()["window"] is None


def test_a_checkpoint_without_the_later_fields_still_reads():
    """A state.pt from before the totals and the window were kept: they start from their defaults."""
    state = TrainingState.from_saved({"step": 4, "best": 3.0, "rng": {}, "optimizer": {}})
    assert (state.engine, state.window, state.train_seconds, state.timed_steps, state.wall_seconds,
            state.sessions, state.val_nll, state.total_steps) == ("single", None, 0.0, 0, 0.0, 1, None, None)
