"""Faults injected into training runs where they hurt most: a kill -9 at every write of a session,
a disk that fills up while each kind of file is written (and a real full tmpfs where one can be
mounted), a second and a third Ctrl-C/SIGTERM during a checkpoint write, and signals while a
resume sets up. After each: no partial file left that blocks anything, `last` names a whole
checkpoint, the metrics lines written before the fault are still there, and `tdlm run --resume`
ends with exactly the metrics and weights of an uninterrupted run."""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from toydata import toy_recipe

from tdlm import files
from tdlm.cli import cli
from tdlm.errors import WriteError
from tdlm.rundir import run_status
from tdlm.training import checkpointer as ckpt
from tdlm.training.monitor import read_metrics
from tdlm.training.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
SAVES_EVERY_2 = ("--set", "training.checkpoint_every=2")  # saves at 2, 4, 6, 8: more writes to hit
NO_TENSORBOARD = "tensorboard = false\n"  # (appended to [logging]) its writer thread is not ours to fault


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def comparable(records):
    """Metrics that must be identical between two runs (wall-clock figures are not)."""
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in records]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    """An uninterrupted run (its metrics and last weights) and a run stopped at step 4: the
    starting point every test copies, then faults while it resumes."""
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        recipe = toy_recipe(root / "r.toml", corpus, root / "runs", extra=NO_TENSORBOARD)
        for args in (["--set", "run.name=straight"], ["--set", "run.name=base", "--stop-at", 4]):
            result = invoke("run", recipe, *SAVES_EVERY_2, *args)
            assert result.exit_code == 0, result.output
    run = root / "runs" / "straight"
    return SimpleNamespace(metrics=comparable(read_metrics(run)), base=root / "runs" / "base",
                           weights=load_file(ckpt.checkpoint_dir(run, "last") / "model.safetensors"))


@pytest.fixture
def stopped(straight, tmp_path, corpus, toy_cache):
    """(recipe, run dir) of a copy of the run stopped at step 4."""
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs", extra=NO_TENSORBOARD)
    shutil.copytree(straight.base, tmp_path / "runs" / "r")
    return recipe, tmp_path / "runs" / "r"


def assert_whole(run_dir: Path, last_step: int | None = None) -> None:
    """No partial file anywhere, and `last` names a checkpoint that reads back."""
    assert sorted(run_dir.rglob("*.tmp")) == []
    path, state, weights, skipped = ckpt.readable_checkpoint(run_dir)
    assert skipped == [] and path == ckpt.checkpoint_dir(run_dir, "last")
    if last_step is not None:
        assert state["step"] == last_step


def assert_resumes_as_uninterrupted(recipe: Path, run_dir: Path, straight, *options) -> None:
    result = invoke("run", recipe, "--resume", *SAVES_EVERY_2, *options)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert sorted(run_dir.rglob("*.tmp")) == []
    assert comparable(read_metrics(run_dir)) == straight.metrics
    weights = load_file(ckpt.checkpoint_dir(run_dir, "last") / "model.safetensors")
    assert all(torch.equal(weights[k], straight.weights[k]) for k in straight.weights)


def assert_kept(before: list[dict], run_dir: Path) -> None:
    """Every metrics record written before the fault is still there, in order."""
    assert read_metrics(run_dir)[: len(before)] == before


# -- kill -9 ----------------------------------------------------------------------------------
class Snapshots:
    """Copies of a run directory as a kill -9 would leave it just before each file-system change
    a session makes (rename, unlink, mkdir, rmdir, fsync, and the first write into each file
    tdlm.files opens): a kill leaves what is on disk at that moment."""

    OPERATIONS = ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync")

    def __init__(self, run_dir: Path, into: Path, monkeypatch):
        self.run_dir, self.into, self.taken, self.busy = run_dir, into, [], False
        for name in self.OPERATIONS:
            monkeypatch.setattr(os, name, self.before(getattr(os, name)))
        monkeypatch.setattr(files, "open", self.opening, raising=False)

    def take(self) -> None:
        if not self.busy and self.run_dir.is_dir():
            self.busy = True  # copytree makes folders too
            try:
                copy = self.into / str(len(self.taken)) / self.run_dir.name
                shutil.copytree(self.run_dir, copy)
                self.taken.append(copy)
            finally:
                self.busy = False

    def before(self, operation):
        def snapshot_first(*args, **kwargs):
            self.take()
            return operation(*args, **kwargs)

        return snapshot_first

    def opening(self, *args, **kwargs):
        f, snapshots = builtins.open(*args, **kwargs), self

        class FirstWrite:
            def write(self, data):
                self.write = f.write
                snapshots.take()
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return FirstWrite()


@pytest.fixture
def killed_everywhere(stopped, tmp_path, monkeypatch):
    """A resumed session run to its end with a snapshot before each of its writes: (recipe, the
    snapshots, the metrics records before the session)."""
    recipe, run_dir = stopped
    before = read_metrics(run_dir)
    with monkeypatch.context() as patch:
        snapshots = Snapshots(run_dir, tmp_path / "killed", patch)
        result = invoke("run", recipe, "--resume", *SAVES_EVERY_2)
    assert result.exit_code == 0, result.stderr
    assert len(snapshots.taken) > 40  # claim, metrics rewrite, three saves, summary: seen
    return recipe, snapshots.taken, before


def test_a_kill_9_at_any_write_of_a_session_leaves_last_whole_and_the_metrics_kept(killed_everywhere):
    recipe, taken, before = killed_everywhere
    for run_dir in taken:
        assert run_status(run_dir) in ("stopped", "finished")
        path, state, weights, skipped = ckpt.readable_checkpoint(run_dir)
        assert skipped == [] and path == ckpt.checkpoint_dir(run_dir, "last"), run_dir
        assert_kept(before, run_dir)


def _resume_snapshot(recipe, run_dir, straight):
    assert_resumes_as_uninterrupted(recipe, run_dir, straight, "--set", f"run.out_dir={json.dumps(str(run_dir.parent))}")


def _state_on_disk(run_dir: Path) -> tuple:
    """What a resume reads of a killed run: its pointers, checkpoint directories, metrics lines and
    summary, and whether partial files lie about."""
    root = run_dir / "checkpoints"
    return (*(ckpt.read_pointer(run_dir, which)["dir"] if (root / f"{which}.json").exists() else None
              for which in ckpt.POINTERS),
            tuple(sorted(p.name for p in root.iterdir() if p.is_dir())),
            len((run_dir / "metrics.jsonl").read_text().splitlines()), (run_dir / "summary.json").exists(),
            any(run_dir.rglob("*.tmp")))


def test_a_run_killed_at_any_write_resumes_as_if_never_killed(killed_everywhere, straight):
    """One resume from each distinct state a kill can leave (snapshots between which nothing a
    resume reads changed are one case; the slow test below resumes from every snapshot)."""
    recipe, taken, _ = killed_everywhere
    cases = {_state_on_disk(run_dir): run_dir for run_dir in reversed(taken)}
    assert len(cases) > 10, len(cases)
    for run_dir in cases.values():
        _resume_snapshot(recipe, run_dir, straight)


@pytest.mark.slow
def test_a_run_killed_at_each_write_resumes_as_if_never_killed(killed_everywhere, straight):
    recipe, taken, _ = killed_everywhere
    for run_dir in taken:
        _resume_snapshot(recipe, run_dir, straight)


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_random_kill_9_of_a_training_process_loses_nothing(stopped, straight, tmp_path):
    """The real thing: `tdlm run --resume` killed by SIGKILL at random moments (a checkpoint every
    step, so that many kills land in a save), then resumed to its end: the metrics and weights of
    the same resume run without a kill."""
    recipe, run_dir = stopped
    longer = ["--set", "training.checkpoint_every=1", "--set", "training.max_steps=60"]
    reference = tmp_path / "reference" / "r"
    shutil.copytree(run_dir, reference)
    where = ["--set", f"run.out_dir={json.dumps(str(reference.parent))}"]
    assert invoke("run", recipe, "--resume", *longer, *where).exit_code == 0
    rng, env = random.Random(1), {**python_env(), "PYTHONUNBUFFERED": "1"}
    for _ in range(5):
        checkpointed = ckpt.last_step(run_dir)  # a resume redoes (and logs again) the steps after it,
        before = [r for r in read_metrics(run_dir) if r["step"] < checkpointed or (  # and the final scoring
            r["step"] == checkpointed and not r["kind"].startswith("final_"))]
        child = subprocess.Popen([sys.executable, "-m", "tdlm", "run", str(recipe), "--resume", *longer], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        while not child.stdout.readline().startswith(b"tdlm: r ->"):  # set up: it trains from here
            assert child.poll() is None, "the run ended before training"
        time.sleep(rng.uniform(0, 1))
        child.kill()
        child.wait()
        assert_kept(before, run_dir)
        path, state, weights, skipped = ckpt.readable_checkpoint(run_dir)
        assert skipped == [] and path == ckpt.checkpoint_dir(run_dir, "last")
    result = invoke("run", recipe, "--resume", *longer)
    assert result.exit_code == 0, result.stderr
    assert sorted(run_dir.rglob("*.tmp")) == []
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(reference))
    weights, expected = (load_file(ckpt.checkpoint_dir(d, "last") / "model.safetensors") for d in (run_dir, reference))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


# -- a full disk ------------------------------------------------------------------------------
class FaultyFiles:
    """Stands in for tdlm.files' `open`. In the middle of the first write to `target` (a file's
    name, or `.NAME` for the temporary file that NAME is written to), half of the bytes reach the
    file, then: without `signals`, the disk is full (that write and every later one fail with
    ENOSPC); with them, they are sent to this process and the write goes on."""

    def __init__(self, target: str, signals: tuple[int, ...] = ()):
        self.target, self.signals, self.hit = target, signals, False

    def __call__(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        name = Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name
        aimed = name == self.target or (self.target.startswith(".") and name.startswith(self.target + "."))
        return FaultyFile(f, self, aimed)


class FaultyFile:
    def __init__(self, f, faults: FaultyFiles, aimed: bool):
        self.f, self.faults, self.aimed = f, faults, aimed

    def write(self, data):
        faults = self.faults
        if self.aimed and not faults.hit:
            faults.hit, half = True, len(data) // 2
            self.f.write(data[:half])
            self.f.flush()
            for signum in faults.signals:
                os.kill(os.getpid(), signum)  # its handler runs here, as between two writes of a real save
            if faults.signals:
                return half + self.f.write(data[half:])
        if faults.hit and not faults.signals:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def last_line(result, code: int, start: str, *fragments) -> str:
    """Exit `code`, no traceback, and the last line of stderr (the ones before it are warnings,
    such as the resume's changed settings) starts with `start` and holds every fragment."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(start) and all(line.startswith("tdlm: ") for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def one_line(result, *fragments) -> str:
    return last_line(result, 2, "tdlm: error: ", *fragments)


@pytest.mark.parametrize("target, last_step, fragments", [
    (".config.json", 4, ["config.json was not written"]),  # rewritten at resume: the run moved
    (".metrics.jsonl", 4, ["metrics.jsonl was not written"]),  # cut back to the checkpoint at resume
    ("metrics.jsonl", 4, ["metrics.jsonl was not written", "stopped at step 6", "last checkpoint, step 4"]),
    (".model.safetensors", 4, ["checkpoint of step 6 was not written", "(step 4) is kept"]),
    (".state.pt", 4, ["checkpoint of step 6 was not written", "(step 4) is kept"]),
    (".last.json", 4, ["checkpoint of step 6 was not written", "(step 4) is kept"]),
    (".summary.json", 8, ["summary.json was not written", "last checkpoint, step 8"]),
])
def test_a_disk_that_fills_up_is_one_line_loses_nothing_and_the_run_resumes(stopped, straight, monkeypatch,
                                                                            target, last_step, fragments):
    recipe, run_dir = stopped
    before = read_metrics(run_dir)
    with monkeypatch.context() as patch:
        patch.setattr(files, "open", FaultyFiles(target), raising=False)
        result = invoke("run", recipe, "--resume", *SAVES_EVERY_2)
    one_line(result, "no space left in", "free some space", *fragments)
    assert_whole(run_dir, last_step)
    assert_kept(before, run_dir)
    assert_resumes_as_uninterrupted(recipe, run_dir, straight)


def test_a_new_run_whose_config_cannot_be_written_leaves_nothing(tmp_path, corpus, toy_cache, monkeypatch):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs", extra=NO_TENSORBOARD)
    with monkeypatch.context() as patch:
        patch.setattr(files, "open", FaultyFiles(".config.json"), raising=False)
        one_line(invoke("run", recipe), f"no space left in {tmp_path / 'runs' / 'r'}", "config.json was not written")
    assert not (tmp_path / "runs" / "r").exists()  # nothing to set aside, nothing half-written
    assert invoke("run", recipe, "--set", "training.max_steps=2").exit_code == 0


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left in"), (errno.EDQUOT, "no space left in"),
                                         (errno.EROFS, "is on a read-only file system"),
                                         (errno.EACCES, "no permission to write in")])
@pytest.mark.parametrize("failing", ["write", "rename"])
def test_the_atomic_writer_keeps_the_old_file_and_names_the_folder(tmp_path, monkeypatch, code, words, failing):
    target = tmp_path / "state.json"
    target.write_text("old")

    def fail(*args):
        raise OSError(code, os.strerror(code))

    def write_half(f):
        f.write(b"half of it")
        fail()

    with monkeypatch.context() as patch:
        if failing == "rename":
            patch.setattr(os, "replace", fail)
        with pytest.raises(WriteError) as info:
            files.write_atomically(target, write_half if failing == "write" else b"new")
    message = str(info.value)
    assert words in message and str(tmp_path) in message and "state.json was not written" in message
    assert info.value.errno == code and "\n" not in message
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_append_that_fails_leaves_no_part_of_its_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    files.append_line(path, '{"step": 1}')
    with monkeypatch.context() as patch:
        patch.setattr(files, "open", FaultyFiles("metrics.jsonl"), raising=False)
        with pytest.raises(WriteError, match="no space left in"):
            files.append_line(path, '{"step": 2, "kind": "train"}')
    assert path.read_text() == '{"step": 1}\n'


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MB tmpfs: a disk that really fills up (skipped where mounting is not allowed)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if sys.platform != "linux" or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                                                 capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_really_full_disk_keeps_last_and_the_run_resumes(stopped, straight, tmpfs):
    recipe, run_dir = stopped
    moved = tmpfs / "r"
    shutil.copytree(run_dir, moved)
    free = shutil.disk_usage(tmpfs).free
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * (free - 120_000))  # less than a checkpoint is left
    where = ("--set", f"run.out_dir={json.dumps(str(tmpfs))}")
    result = invoke("run", recipe, "--resume", *SAVES_EVERY_2, *where)
    one_line(result, "no space left in", "free some space", "--resume")
    assert_whole(moved)
    filler.unlink()
    assert_resumes_as_uninterrupted(recipe, moved, straight, *where)


# -- Ctrl-C and SIGTERM -----------------------------------------------------------------------
def interrupted(result, signum: int, *fragments) -> str:
    return last_line(result, 128 + signum, "tdlm: ", *fragments)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_a_checkpoint_write_finishes_it_then_stops(stopped, straight, monkeypatch, signum):
    recipe, run_dir = stopped
    before = read_metrics(run_dir)
    name = signal.Signals(signum).name
    with monkeypatch.context() as patch:
        patch.setattr(files, "open", FaultyFiles(".state.pt", (signum, signum)), raising=False)  # the save of step 6
        result = invoke("run", recipe, "--resume", *SAVES_EVERY_2)
    assert f"{name} received again; finishing the checkpoint of step 6" in result.stdout
    assert result.exit_code == 0 and "stopped at step 6 of 8; continue with" in result.stdout, result.output
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6
    assert_whole(run_dir, 6)
    assert_kept(before, run_dir)
    assert_resumes_as_uninterrupted(recipe, run_dir, straight)


def test_a_third_signal_drops_the_checkpoint_being_written_and_keeps_last(stopped, straight, monkeypatch):
    recipe, run_dir = stopped
    before = read_metrics(run_dir)
    with monkeypatch.context() as patch:
        patch.setattr(files, "open", FaultyFiles(".model.safetensors", (signal.SIGINT,) * 3), raising=False)  # the save of step 6
        result = invoke("run", recipe, "--resume", *SAVES_EVERY_2)
    interrupted(result, signal.SIGINT, "a third time", "checkpoint of step 6 was being written",
                "last checkpoint, step 4")
    assert_whole(run_dir, 4)
    assert not ckpt.final_dir(run_dir, 6).exists()
    assert_kept(before, run_dir)
    assert_resumes_as_uninterrupted(recipe, run_dir, straight)


def test_a_second_signal_between_checkpoints_stops_at_once(stopped, straight, monkeypatch):
    recipe, run_dir = stopped
    step = Trainer.run_step

    def interrupted_step(self):
        if self.step == 4:  # the resumed session's first step
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run_step", interrupted_step)
        result = invoke("run", recipe, "--resume", *SAVES_EVERY_2)
    interrupted(result, signal.SIGINT, "received again: stopped at once", "last checkpoint, step 4")
    assert_whole(run_dir, 4)
    assert_resumes_as_uninterrupted(recipe, run_dir, straight)


def test_a_signal_while_a_resume_rewrites_the_metrics_stops_it_and_keeps_them(stopped, straight, monkeypatch):
    recipe, run_dir = stopped
    before = (run_dir / "metrics.jsonl").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(files, "open", FaultyFiles(".metrics.jsonl", (signal.SIGTERM,)), raising=False)
        result = invoke("run", recipe, "--resume", *SAVES_EVERY_2)
    interrupted(result, signal.SIGTERM, "while the run was setting up", "last checkpoint, step 4")
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert_whole(run_dir, 4)
    assert_resumes_as_uninterrupted(recipe, run_dir, straight)
