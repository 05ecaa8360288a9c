"""summary.json's timing: a run's seconds by phase, start-up apart from training, evaluation and
the final scoring, so a claim such as "the whole run in 60 s" can be checked against its parts."""

import json

import pytest


def test_summary_times_every_phase(trained_pair):
    summary = json.loads((trained_pair["diffusion"] / "summary.json").read_text())
    timing = summary["timing"]
    assert set(timing) == {"startup_s", "first_step_s", "eval_s", "save_s", "final_scoring_s", "command_s"}
    assert all(value > 0 for value in timing.values()), timing
    # the command is its start-up, then the loop (wall_time_s: training, evals, saves, final scoring)
    assert timing["command_s"] == pytest.approx(timing["startup_s"] + summary["wall_time_s"], abs=0.05)
    parts = summary["train_seconds"] + timing["eval_s"] + timing["save_s"] + timing["final_scoring_s"]
    assert parts <= summary["wall_time_s"] + 1e-6
    assert timing["first_step_s"] <= summary["train_seconds"]
