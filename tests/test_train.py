"""Training runs end to end: files written, exact resume, NaN handling, atomic checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from toydata import toy_recipe

from tdlm.training import checkpointer as ckpt
from tdlm.cli import cli
from tdlm.config import read_recipe, resolve_components, resolved_dict
from tdlm.training.monitor import read_metrics
from tdlm.registry import build_registry
from tdlm.training.trainer import Trainer, TrainingDiverged

# Tiny models train far faster on one thread (two spin against each other on a busy machine).


@pytest.fixture(autouse=True)
def cache_dir(toy_cache):
    """Every test here keeps its caches in the session's temporary folder (conftest)."""


def run_cli(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def comparable(records):
    """Metrics that must be identical between two runs (wall-clock figures are not)."""
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in records]


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_run_writes_everything_a_user_and_a_script_need(tmp_path, corpus, objective):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs", objective=objective)
    result = run_cli("run", str(recipe))
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 8
    assert summary["test"]["is_bound"] is (objective == "diffusion")
    assert summary["test"]["tokens"] > 0 and math.isfinite(summary["test"]["nll_per_token"])
    assert summary["tokens_seen"] == 8 * 8 * 32
    assert summary["epochs"] == pytest.approx(summary["tokens_seen"] / summary["train_tokens"], rel=0.2)
    assert summary["flops_per_token"] > 6 * summary["non_embedding_parameters"]
    assert summary["train_tokens_per_s"] > 0 and summary["mfu"] is None  # no peak figure for a CPU
    kinds = {r["kind"] for r in read_metrics(run_dir)}
    assert {"train", "val", "final_valid", "final_test"} <= kinds
    if objective == "diffusion":
        assert {"train_by_t", "val_by_t"} <= kinds
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    tags = board.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/nll_per_token",
            "val/ppl", "val/bits_per_byte"} <= set(tags["scalars"])
    assert {"config/text_summary", "sample/0/text_summary"} <= set(tags["tensors"])
    if objective == "diffusion":
        assert "train_by_t/loss_t0.0" in tags["scalars"] or "train_by_t/loss_t0.1" in tags["scalars"]
    # the saved resolved config is itself a recipe that validates to the same config
    def resolved(path):
        cfg = read_recipe(path)
        return resolved_dict(cfg, resolve_components(cfg, build_registry()))

    assert resolved(run_dir / "config.toml") == resolved(recipe)
    env = json.loads((run_dir / "environment.json").read_text())
    assert "torch" in env["versions"] and "git_commit" in env
    assert env["components"]["objective"] == {"name": objective, "plugin": f"tdlm.builtins.objectives.{objective}",
                                              "package": "tdlm", "version": env["versions"]["tdlm"]}
    assert "test: " in result.output
    # the printed sample says what drew it (a recipe may sample cooler than the model's own chain)
    sampler = "ancestral: steps=" if objective == "diffusion" else "ar: temperature=1.0"
    assert f"sample 0 ({sampler}" in result.output, result.output[-500:]
    assert "=None" not in result.output  # unset options (the AR sampler's top_k, top_p) are left out


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    assert run_cli("run", str(recipe), "--set", "run.name=straight").exit_code == 0
    stopped = run_cli("run", str(recipe), "--set", "run.name=resumed", "--stop-at", "3")
    assert stopped.exit_code == 0 and "--resume" in stopped.output
    assert json.loads((tmp_path / "runs/resumed/summary.json").read_text())["status"] == "stopped"
    resumed = run_cli("run", str(recipe), "--set", "run.name=resumed", "--resume")
    assert resumed.exit_code == 0, resumed.output

    straight, again = tmp_path / "runs/straight", tmp_path / "runs/resumed"
    # the whole file, record for record: step 3 is not a log step (log_every = 2), so the stop
    # logs nothing there and the window of steps 3-4 is logged at step 4, as without the stop
    a, b = comparable(read_metrics(straight)), comparable(read_metrics(again))
    assert [r["step"] for r in a if r["kind"] == "val"] == [4, 8]
    assert [(r["step"], r["kind"]) for r in a if r["kind"] == "train"] == [(2, "train"), (4, "train"),
                                                                          (6, "train"), (8, "train")]
    assert a == b
    from safetensors.torch import load_file

    wa = load_file(ckpt.checkpoint_dir(straight, "last") / "model.safetensors")
    wb = load_file(ckpt.checkpoint_dir(again, "last") / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_is_never_overwritten(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs", extra="")
    assert run_cli("run", str(recipe), "--set", "training.max_steps=4").exit_code == 0
    before = (tmp_path / "runs/r/summary.json").read_text()
    again = CliRunner().invoke(cli, ["run", str(recipe)])
    assert again.exit_code == 2
    assert "--resume" in again.output and "already holds a run" in again.output
    assert (tmp_path / "runs/r/summary.json").read_text() == before
    nothing = CliRunner().invoke(cli, ["run", str(recipe), "--set", "run.name=new", "--resume"])
    assert nothing.exit_code == 2 and "no checkpoint to resume" in nothing.output


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    cfg = read_recipe(recipe, ["training.checkpoint_every=2", "training.max_steps=20"])
    trainer = Trainer(cfg, resolve_components(cfg, build_registry()))
    objective = trainer.built.model.objective
    real_loss = objective.loss

    def poisoned(net, x0, generator):
        loss, stats = real_loss(net, x0, generator)
        return (loss * float("nan") if trainer.step >= 5 else loss), stats

    objective.loss = poisoned
    with pytest.raises(TrainingDiverged, match="last good checkpoint") as info:
        trainer.fit()
    assert "step 6" in str(info.value)
    last = ckpt.read_pointer(trainer.run_dir, "last")
    assert last["step"] == 4  # saved before the NaN; the NaN step's weights were never saved
    weights = ckpt.checkpoint_dir(trainer.run_dir, "last") / "model.safetensors"
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(weights).values())


def test_a_kill_during_a_checkpoint_write_leaves_the_last_checkpoint_intact(tmp_path, corpus, monkeypatch):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    assert run_cli("run", str(recipe), "--stop-at", "4").exit_code == 0
    run_dir = tmp_path / "runs/r"
    before = ckpt.read_pointer(run_dir, "last")

    class Killed(BaseException):
        """Stands in for SIGKILL: nothing after it runs (click turns KeyboardInterrupt into an exit)."""

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(Killed):
        CliRunner().invoke(cli, ["run", str(recipe), "--resume", "--stop-at", "6"], catch_exceptions=False)
    monkeypatch.undo()
    assert ckpt.read_pointer(run_dir, "last") == before
    assert (ckpt.checkpoint_dir(run_dir, "last") / "state.pt").exists()
    resumed = run_cli("run", str(recipe), "--resume")  # and the run still resumes and finishes
    assert resumed.exit_code == 0, resumed.output


def test_eval_and_sample_commands_on_a_trained_run(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    assert run_cli("run", str(recipe)).exit_code == 0
    run_dir = str(tmp_path / "runs/r")
    out = run_cli("eval", run_dir, "--split", "test", "--json", "--t-samples", "3")
    result = json.loads(out.stdout)
    for key in ("objective", "split", "tokens", "nll_per_token", "ppl", "bits_per_byte", "stderr", "is_bound"):
        assert key in result
    assert result["split"] == "test" and result["is_bound"] and result["t_samples"] == 3
    assert len(result["t_buckets"]) == 10 and 0 <= result["masked_accuracy"] <= 1
    again = json.loads(run_cli("eval", run_dir, "--split", "test", "--json", "--t-samples", "3").stdout)
    assert again["nll_per_token"] == result["nll_per_token"]  # fixed seed: reproducible
    summary = json.loads((tmp_path / "runs/r/summary.json").read_text())
    assert summary["test"]["tokens"] == result["tokens"]

    sampled = json.loads(run_cli("sample", run_dir, "--num", "2", "--length", "16", "--prompt", "the cat",
                                 "--json", "--option", "steps=8").stdout)
    assert len(sampled["samples"]) == 2 and 1 <= sampled["nfe"] <= 8
    assert all(text.startswith("the cat") for text in sampled["samples"])
    assert all("<mask>" not in text for text in sampled["samples"])


def test_a_trainer_whose_sampler_drafts_needs_a_draft_loader_before_it_trains(tmp_path, corpus):
    """Found when the Trainer is built, not at the first evaluation's sample minutes later."""
    from tdlm.errors import RunError

    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs",
                        extra='[sampler]\nname = "speculative"\ndraft = "runs/some-draft"\n')
    cfg = read_recipe(recipe)
    with pytest.raises(RunError, match=r"drafts from the run 'runs/some-draft' .* pass load_draft=tdlm.rundir.load_draft"):
        Trainer(cfg, resolve_components(cfg, build_registry()))
