"""Work that cannot succeed is refused up front, in one line (exit code 2), and messages say what
happened and the one thing to do: no silent hours of sampling, no shards of 0 sequences, no run
that is all warm-up, no advice that points in a circle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_damaged_runs import invoke, ok, one_line_error

from tdlm.cli import cli  # noqa: F401 - invoke runs it


@pytest.fixture(autouse=True)
def cache_dir(trained_pair, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))


@pytest.fixture
def recipe(trained_pair, tmp_path) -> Path:
    """The toy diffusion run's own recipe, training into tmp_path/runs."""
    path = tmp_path / "r.toml"
    text = (trained_pair["diffusion"] / "config.toml").read_text()
    path.write_text(text.replace(str(trained_pair["diffusion"].parent), str(tmp_path / "runs")))
    return path


REFUSED = {
    "prepare-0-sequences": (lambda c, tmp, run: ["data", "prepare", c, "--out", tmp / "shards", "--seq-len", 100000,
                                                 "--shard-size", 10, "--tokenizer", "bpe", "--bpe-vocab-size", 300],
                            "is 9,", "tokens, fewer than one sequence of --seq-len 100000", "0 sequences"),
    "steps-billion": (lambda c, tmp, run: ["sample", run, "--num", 1, "--option", "steps=1000000000"],
                      "steps = 1,000,000,000", "32-token canvas", "steps <= 32,768"),
    "inner-steps-billion": (lambda c, tmp, run: ["sample", run, "--num", 1, "--sampler", "semi-ar", "--option",
                                                 "inner_options={steps=1000000000}"], "inner_options.steps"),
    "temperature-inf": (lambda c, tmp, run: ["sample", run, "--option", "temperature=inf"],
                        "sampler.temperature", "finite number"),
    "temperature-nan": (lambda c, tmp, run: ["sample", run, "--option", "temperature=nan"],
                        "sampler.temperature", "finite number"),
    "temperature-0": (lambda c, tmp, run: ["sample", run, "--option", "temperature=0"],
                      "sampler.temperature", "greater than 0"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_work_that_cannot_succeed_is_refused(name, trained_pair, tmp_path):
    build, *fragments = REFUSED[name]
    one_line_error(invoke(*build(trained_pair["corpus"], tmp_path, trained_pair["diffusion"])), *fragments)
    assert not (tmp_path / "shards").exists()  # nothing half-written


def test_a_warm_up_longer_than_the_run_is_refused_naming_both_keys(recipe, tmp_path):
    one_line_error(invoke("run", recipe, "--check", "--set", "training.warmup_steps=8"),
                   "training.warmup_steps = 8", "8 steps", "training.max_steps")
    epochs = ["--set", "training.max_steps=none", "--set", "training.epochs=0.1", "--set", "training.warmup_steps=5"]
    one_line_error(invoke("run", recipe, *epochs), "training.warmup_steps = 5", "training.epochs")
    assert not (tmp_path / "runs" / "diffusion").exists()
    ok(invoke("run", recipe, "--check", "--set", "training.warmup_steps=7"))


def test_a_recipe_with_endless_sampler_steps_is_refused_before_training(recipe, tmp_path):
    one_line_error(invoke("run", recipe, "--set", "sampler.steps=1000000000"), "steps = 1,000,000,000")
    assert not (tmp_path / "runs" / "diffusion" / "checkpoints").exists()
