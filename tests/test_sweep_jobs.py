"""`tdlm sweep --jobs N`: runs at once give the figures they give one by one; a failure does
not stop the others; Ctrl-C makes every running run checkpoint and stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_sweep import write_sweep

from tdlm.cli import cli
from tdlm.studies.sweep import load_sweep
from tdlm.studies.sweep_jobs import job_environment, run_sweep_jobs
from tdlm.training.monitor import read_metrics

TIMING = {"tokens_per_s", "time"}  # wall-clock figures: the only ones allowed to differ
SUMMARY_TIMING = {"train_tokens_per_s", "train_seconds", "wall_time_s", "mfu", "timing"}


@pytest.fixture()
def sweep_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TDLM_CACHE_DIR", str(tmp_path / "cache"))
    return write_sweep(tmp_path, '[[zip]]\nlabels = ["small", "big"]\n"model.d_model" = [32, 64]\n')


def test_threads_are_split_between_jobs():
    assert job_environment(2, cores=2, base={})["OMP_NUM_THREADS"] == "1"
    assert job_environment(3, cores=16, base={})["OMP_NUM_THREADS"] == "5"
    assert job_environment(4, cores=2, base={})["OMP_NUM_THREADS"] == "1"  # never 0
    assert job_environment(2, cores=16, base={"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "2"  # a lower setting stays


def figures(run_dir: Path) -> tuple[list, dict]:
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]
    summary = json.loads((run_dir / "summary.json").read_text())
    return records, {k: v for k, v in summary.items() if k not in SUMMARY_TIMING}


def test_two_jobs_give_the_figures_of_one_job(sweep_file, monkeypatch):
    """Real `tdlm run` children: --jobs 1 then --jobs 2 of the same two toy runs. Each child runs
    one torch thread either way (OMP_NUM_THREADS=1), so the arithmetic is the same."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = CliRunner().invoke(cli, ["sweep", str(sweep_file), "--only", "*-small"])
    assert one.exit_code == 0, one.output
    Path("runs/s").rename("runs/one-by-one")
    two = CliRunner().invoke(cli, ["sweep", str(sweep_file), "--only", "*-small", "--jobs", "2"])
    assert two.exit_code == 0, two.output
    assert "2 finished, 0 skipped, 0 failed, 0 stopped" in two.output
    assert "started diffusion-small" in two.output and "started ar-small" in two.output
    assert "running: diffusion-small, ar-small" in two.output  # both at once
    for name in ("diffusion-small", "ar-small"):
        records, summary = figures(Path("runs/s") / name)
        assert (records, summary) == figures(Path("runs/one-by-one") / name), name
        assert summary["status"] == "finished" and summary["test"]["nll_per_token"] > 0
        assert (Path("runs/s/.logs") / f"{name}.log").read_text().count("tdlm: ") >= 1


class FakeChild:
    """Stands in for a `tdlm run` process: exits with `code` after `polls` polls and, when it
    finishes cleanly, leaves a finished run directory."""

    def __init__(self, run_dir: Path, code: int, polls: int = 3):
        self.run_dir, self.code, self.polls, self.signals = run_dir, code, polls, []

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        if self.code == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "summary.json").write_text('{"status": "finished"}')
        return self.code

    def send_signal(self, signum):
        self.signals.append(signum)


def test_a_failed_run_does_not_stop_the_others_and_fails_the_command(sweep_file, monkeypatch):
    started = {}

    def start(args, log, env):
        name = json.loads(next(a for a in args if a.startswith("run.name=")).partition("=")[2])
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("Traceback ...\nValueError: boom\n" if name == "diffusion-small" else "ok\n")
        started[name] = FakeChild(Path("runs/s") / name, code=1 if name == "diffusion-small" else 0)
        return started[name]

    monkeypatch.setattr("tdlm.studies.sweep_jobs.start_child", start)
    monkeypatch.setattr("tdlm.studies.sweep_jobs.POLL_SECONDS", 0.0)
    result = CliRunner().invoke(cli, ["sweep", str(sweep_file), "--jobs", "2"])
    assert result.exit_code == 1
    assert set(started) == {"diffusion-small", "diffusion-big", "ar-small", "ar-big"}  # the failure stopped nothing
    assert "3 finished, 0 skipped, 1 failed, 0 stopped" in result.output
    assert "failed diffusion-small (exit code 1" in result.output and "ValueError: boom" in result.output


def test_jobs_never_exceed_the_limit(sweep_file):
    live, most = set(), [0]

    class Tracked(FakeChild):
        def poll(self):
            code = super().poll()
            if code is not None:
                live.discard(self.run_dir.name)
            return code

    def start(args, log, env):
        name = json.loads(next(a for a in args if a.startswith("run.name=")).partition("=")[2])
        live.add(name)
        most[0] = max(most[0], len(live))
        return Tracked(Path("runs/s") / name, code=0, polls=2 + len(live))

    outcome = run_sweep_jobs(load_sweep(sweep_file).runs, 3, Path("runs/s/.logs"), start=start, echo=lambda line: None)
    assert most[0] == 3 and len(outcome["finished"]) == 4


def test_ctrl_c_makes_every_running_run_checkpoint_and_stop(sweep_file):
    """The real thing: two long toy runs at once, SIGINT to the sweep (as a terminal's Ctrl-C,
    which reaches the sweep alone: its children have process groups of their own)."""
    text = sweep_file.read_text()
    sweep_file.write_text(text + '[fixed]\n"training.max_steps" = 100000\n"training.eval_every" = 100000\n'
                          '"training.log_every" = 1\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "tdlm", "sweep", str(sweep_file), "--only", "*-small",
                              "--jobs", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [Path("runs/s/diffusion-small"), Path("runs/s/ar-small")]
    deadline = time.time() + 240
    try:
        while not all(read_metrics(r, "train") for r in runs if (r / "metrics.jsonl").exists()) or \
                not all((r / "metrics.jsonl").exists() for r in runs):
            assert time.time() < deadline and sweep.poll() is None, "the runs did not start"
            time.sleep(0.5)
        sweep.send_signal(signal.SIGINT)
        out, _ = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, out
    assert "0 finished, 0 skipped, 0 failed, 2 stopped" in out
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "stopped"
        assert json.loads((run / "checkpoints" / "last.json").read_text())["step"] == summary["step"] >= 1
        assert "saving a checkpoint after this step" in (Path("runs/s/.logs") / f"{run.name}.log").read_text()
