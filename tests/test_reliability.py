"""Run directories under stress: two runs at once, resumes with another recipe, diverging
weights, samplers of the other objective, crashes before the first checkpoint, torn metrics
files, figures across sessions, bad --stop-at and run names, and DeepSpeed left unimported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from toydata import toy_recipe

from tdlm import files
from tdlm.training import checkpointer as ckpt
from tdlm.cli import cli
from tdlm.config import read_recipe, resolve_components
from tdlm.training.monitor import read_metrics, rewrite_metrics
from tdlm.registry import build_registry
from tdlm.training.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parent.parent



@pytest.fixture(autouse=True)
def cache_dir(toy_cache):
    """Every test here keeps its caches in the session's temporary folder (conftest)."""


def invoke(*args):
    """`tdlm ARGS` in this process; stderr apart from stdout."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments):
    """Exit code 2, no traceback, one line on stderr holding every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdlm: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # toy trainings in a child process: one thread, as in this one
    return env


# -- 1. one process per run directory ---------------------------------------------------------
def test_a_live_run_holds_its_directory_until_it_dies(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs",
                        extra="")  # runs/r; the long run below never reaches a checkpoint
    run_dir = tmp_path / "runs" / "r"
    args = ["run", str(recipe), "--set", "training.max_steps=100000", "--set", "training.log_every=1",
            "--set", "training.eval_every=100000"]
    live = subprocess.Popen([sys.executable, "-m", "tdlm", *args], env=python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not read_metrics(run_dir, "train"):
            assert live.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.2)
        holder = f"PID {live.pid}"
        one_line_error(invoke("run", recipe), "in use by another tdlm process", holder)
        one_line_error(invoke("run", recipe, "--resume"), "in use by another tdlm process", holder)
        assert (run_dir / "config.json").exists() and live.poll() is None  # nothing was touched
    finally:
        live.kill()  # SIGKILL: no handler runs, the OS drops the lock
        live.wait()
    # the crashed run never wrote a checkpoint: its directory is set aside and the run starts again
    again = invoke("run", recipe, "--set", "training.max_steps=2", "--set", "eval.final_splits=[]")
    assert again.exit_code == 0, (again.stdout, again.stderr)
    assert "stopped before its first checkpoint" in again.stdout
    assert (tmp_path / "runs" / ".aborted" / "r-1" / "config.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_a_run_that_is_still_setting_up_holds_its_directory(tmp_path, corpus):
    """The race of two `tdlm run` at once: the first has taken the directory but not yet written
    config.json (it is loading data); the second must not pass the "already holds a run" check."""
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tdlm.rundir import RunLock; lock = RunLock(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=python_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_error(invoke("run", recipe), f"PID {holder.pid}")
        assert not (run_dir / "config.json").exists()
    finally:
        holder.stdin.close()  # the holder exits and its lock goes with it
        holder.wait()
    assert invoke("run", recipe, "--set", "training.max_steps=2", "--set", "eval.final_splits=[]").exit_code == 0


def test_a_run_that_fails_before_writing_anything_leaves_no_directory(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    result = invoke("run", recipe, "--set", f'data.path="{tmp_path / "nowhere"}"')
    assert result.exit_code == 2 and "nowhere" in result.stderr
    assert not (tmp_path / "runs" / "r").exists()  # not even the lock file


# -- 2. a resume trains the saved run, or is refused ---------------------------------------------
@pytest.fixture
def stopped_run(tmp_path, corpus):
    """A run stopped at step 4 (a checkpoint), and its recipe."""
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    result = invoke("run", recipe, "--stop-at", 4)
    assert result.exit_code == 0, result.stderr
    return recipe, tmp_path / "runs" / "r"


@pytest.mark.parametrize("override, listed", [
    ("training.lr=0.001", "training.lr: 0.003 -> 0.001"),
    ("objective.name=ar", 'objective.name: "diffusion" -> "ar"'),
    ("model.d_model=64", "model.d_model: 32 -> 64"),
    ("run.seed=8", "run.seed: 7 -> 8"),
])
def test_a_resume_with_another_recipe_is_refused_with_the_differences(stopped_run, override, listed):
    recipe, run_dir = stopped_run
    before = (run_dir / "metrics.jsonl").read_text()
    one_line_error(invoke("run", recipe, "--resume", "--set", override), "--resume: the recipe trains something else",
                   listed, "config.toml --resume")
    assert ckpt.read_pointer(run_dir, "last")["step"] == 4 and (run_dir / "metrics.jsonl").read_text() == before


def test_a_resume_may_change_logging_eval_and_the_length(stopped_run):
    recipe, run_dir = stopped_run
    result = invoke("run", recipe, "--resume", "--set", "eval.sample_num=0", "--set", "training.max_steps=10",
                    "--set", "logging.tensorboard=false", "--set", "training.log_every=1")
    assert result.exit_code == 0, result.stderr
    assert "learning-rate schedule decays over the new total" in result.stderr  # said, not silent
    assert "training.max_steps: 8 -> 10" in result.stderr
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["training"]["max_steps"] == 10 and saved["eval"]["sample_num"] == 0
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10
    shorter = invoke("run", recipe, "--resume", "--set", "training.max_steps=6")
    one_line_error(shorter, "past the recipe's 6 steps")


# -- 3. only finite weights are ever a checkpoint ------------------------------------------------
def test_weights_that_diverge_at_a_checkpoint_step_are_never_saved(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    cfg = read_recipe(recipe, ["training.checkpoint_every=2", "training.max_steps=20"])
    trainer = Trainer(cfg, resolve_components(cfg, build_registry()))
    optimizer_step = trainer.optimizer.step

    def diverging_step(*args, **kwargs):  # the update of step 4 blows up; step 4's loss (before it) is finite
        optimizer_step(*args, **kwargs)
        if trainer.step == 3:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer.optimizer.step = diverging_step
    with pytest.raises(TrainingDiverged, match="last good checkpoint") as info:
        trainer.fit()
    last = ckpt.checkpoint_dir(trainer.run_dir, "last")
    assert str(last) in str(info.value) and last.name == "step-0000002"
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(last / "model.safetensors").values())
    assert not ckpt.final_dir(trainer.run_dir, 4).exists()


# -- 4. a sampler of the other objective -------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(trained_pair):
    """A diffusion and an AR run (the session's, read-only: conftest.trained_pair), in one folder."""
    assert trained_pair["diffusion"].parent == trained_pair["ar"].parent
    return trained_pair["diffusion"].parent


@pytest.mark.parametrize("command", ["sample", "gen-eval"])
@pytest.mark.parametrize("run, sampler, kind", [("diffusion", "ar", "a masked-diffusion"),
                                                ("ar", "ancestral", "an autoregressive"),
                                                ("ar", "confidence", "an autoregressive")])
def test_a_sampler_of_the_other_objective_is_refused(two_runs, command, run, sampler, kind, tmp_path):
    extra = ["--out", tmp_path] if command == "gen-eval" else []
    result = invoke(command, two_runs / run, "--sampler", sampler, "--num", 1, "--length", 8, *extra)
    one_line_error(result, f"sampler {sampler!r}", f"this run is {kind} one")
    assert not list(tmp_path.iterdir())


def test_each_objective_keeps_its_own_samplers(two_runs):
    for run, sampler in (("diffusion", "confidence"), ("ar", "ar")):
        result = invoke("sample", two_runs / run, "--sampler", sampler, "--num", 1, "--length", 8, "--json")
        assert result.exit_code == 0, result.stderr


# -- 5. a crash before the first checkpoint --------------------------------------------------------
def test_a_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, corpus, monkeypatch):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"

    def crash(self):
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run_step", crash)
        with pytest.raises(RuntimeError, match="went away"):
            CliRunner().invoke(cli, ["run", str(recipe)], catch_exceptions=False)
    assert (run_dir / "config.json").exists() and not (run_dir / "checkpoints").exists()
    one_line_error(invoke("run", recipe, "--resume"), "no checkpoint to resume", "stopped before its first checkpoint",
                   "without --resume")
    again = invoke("run", recipe, "--set", "training.max_steps=2", "--set", "eval.final_splits=[]")
    assert again.exit_code == 0, again.stderr
    moved = [line for line in again.stdout.splitlines() if "stopped before its first checkpoint" in line]
    assert len(moved) == 1 and str(tmp_path / "runs" / ".aborted" / "r-1") in moved[0]
    assert (tmp_path / "runs" / ".aborted" / "r-1" / "environment.json").exists()  # set aside, not deleted
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


# -- 6. metrics.jsonl: atomic rewrite, torn last line ------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def test_a_kill_while_metrics_are_rewritten_leaves_the_old_file(tmp_path, monkeypatch):
    records = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 6)]
    rewrite_metrics(tmp_path, records)
    before = (tmp_path / "metrics.jsonl").read_text()

    class HalfWritten:
        """A file whose write stores half of the text, then the process dies."""

        def __init__(self, path, mode="r", *args, **kwargs):
            self.file = open(path, mode, *args, **kwargs)

        def write(self, text):
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise Killed

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(files, "open", HalfWritten, raising=False)  # every run-directory file is written there
    with pytest.raises(Killed):
        rewrite_metrics(tmp_path, records[:3])
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_torn_last_line_is_dropped_with_a_warning_and_the_run_resumes(stopped_run):
    recipe, run_dir = stopped_run
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "train", "lo')  # the kill came mid-line
    result = invoke("run", recipe, "--resume")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "dropped its last line" in line]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0]
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [2, 4, 6, 8]


def test_a_broken_line_inside_metrics_is_a_one_line_error(stopped_run):
    recipe, run_dir = stopped_run
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    one_line_error(invoke("run", recipe, "--resume"), "metrics.jsonl: line 1 is not a metrics record")


# -- 8. summary figures over every session ---------------------------------------------------------
def test_summary_figures_cover_every_session(tmp_path, corpus, monkeypatch):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"
    slow, step_seconds, step = 0.25, [], Trainer.run_step

    def timed_step(self):  # the first session's steps take >= 0.25 s each; every step is timed
        began = time.perf_counter()
        if self.clock.sessions == 1:
            time.sleep(slow)
        loss = step(self)
        step_seconds.append(time.perf_counter() - began)
        return loss

    monkeypatch.setattr(Trainer, "run_step", timed_step)
    assert invoke("run", recipe, "--stop-at", 3).exit_code == 0
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["train_seconds"] >= sum(step_seconds) >= 3 * slow
    assert first["train_tokens_per_s"] == pytest.approx(first["tokens_seen"] / first["train_seconds"])
    step_seconds.clear()
    assert invoke("run", recipe, "--resume").exit_code == 0
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["sessions"] == 2 and second["status"] == "finished" and len(step_seconds) == 5
    # the first session's training time is counted, not only this one's
    assert second["train_seconds"] >= first["train_seconds"] + sum(step_seconds)
    assert second["train_tokens_per_s"] == pytest.approx(second["tokens_seen"] / second["train_seconds"])
    assert second["wall_time_s"] >= first["train_seconds"] + sum(step_seconds)
    # resuming a finished run scores it again; its totals stay those of its training
    third_run = invoke("run", recipe, "--resume")
    assert third_run.exit_code == 0, third_run.stderr
    third = json.loads((run_dir / "summary.json").read_text())
    assert third["sessions"] == 3 and third["train_tokens_per_s"] == second["train_tokens_per_s"]
    assert third["wall_time_s"] >= second["train_seconds"]


# -- 9. --stop-at and run.name -----------------------------------------------------------------------
def test_stop_at_zero_is_an_error(tmp_path, corpus):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    one_line_error(invoke("run", recipe, "--stop-at", 0), "--stop-at 0")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stop_at", [2, 4])
def test_stop_at_not_after_the_resume_step_is_an_error(stopped_run, stop_at):
    recipe, run_dir = stopped_run
    before = (run_dir / "metrics.jsonl").read_text()
    one_line_error(invoke("run", recipe, "--resume", "--stop-at", stop_at), f"--stop-at {stop_at}",
                   "at step 4 already")
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("name", ["", "../x", "/tmp/elsewhere", "a/b", ".."])
def test_a_run_name_must_be_one_folder_under_out_dir(tmp_path, corpus, name):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    one_line_error(invoke("run", recipe, "--check", "--set", f'run.name="{name}"'), "run.name", "one folder name")


# -- 10. DeepSpeed is imported only where it is used ----------------------------------------------------
def test_a_single_process_run_never_imports_deepspeed(tmp_path, corpus):
    pytest.importorskip("deepspeed")
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    commands = [["run", str(recipe), "--set", "training.max_steps=2", "--set", "eval.sample_num=1"],
                ["eval", str(tmp_path / "runs" / "r"), "--t-samples", "1"],
                ["sample", str(tmp_path / "runs" / "r"), "--num", "1", "--length", "8", "--option", "steps=2"]]
    # one fresh interpreter runs the three commands in turn (one import of torch, not three)
    script = ("import json, sys; from tdlm.cli import cli\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    try:\n        cli(args, prog_name='tdlm')\n"
              "    except SystemExit as exc:\n        assert not exc.code, (args, exc.code)\n"
              "    print('deepspeed imported after', args[0], ':', 'deepspeed' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], env=python_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for args in commands:
        assert f"deepspeed imported after {args[0]} : False" in done.stdout, done.stdout
    assert "Setting accelerator" not in done.stderr + done.stdout
