"""Who holds a run directory, and in what state it is: the lock a training process holds, the
one vocabulary of a run's status (for `tdlm run`, sweeps and reports), and claiming a directory
for a new run or a resume.

A training process holds an exclusive lock on `<run dir>/.lock` (flock, with its PID written in
the file) from before it looks at the directory until it exits; the OS drops the lock when the
process dies, however it dies. So two `tdlm run` never train into one directory.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from tdlm.data.locate import file_in_the_way, not_a_folder
from tdlm.errors import RunError
from tdlm.files import remove_temporaries
from tdlm.training.checkpointer import remove_leftovers


# The one vocabulary of a run directory's state, for `tdlm run`, sweeps and reports.
STATUSES = {
    "finished": "trained to its last step and scored (summary.json says so)",
    "stopped": "has a checkpoint but did not finish: stopped on purpose or killed; --resume goes on",
    "aborted": "started but ended before its first checkpoint: nothing to resume; a new start sets it aside",
    "new": "no run there yet",
}


def run_status(run_dir: Path) -> str:
    """The state of a run directory: one of STATUSES."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        if isinstance(summary, dict) and summary.get("status") == "finished":
            return "finished"
    except (OSError, ValueError):  # absent, or damaged (not JSON, not UTF-8): not a finished run's
        pass
    if (run_dir / "checkpoints" / "last.json").exists():
        return "stopped"
    if (run_dir / "config.json").exists():
        return "aborted"
    return "new"


class RunLock:
    """An exclusive flock on `<run_dir>/.lock`, with the holder's PID in the file. Released by
    release(), or by the OS when the process ends (a crash or a kill -9 included)."""

    def __init__(self, run_dir: Path):
        self.fd, self.run_dir = None, Path(run_dir)
        blocker = file_in_the_way(self.run_dir)
        if blocker is not None:
            raise RunError(f"cannot make the run directory {self.run_dir}: {blocker} {not_a_folder(blocker)}; "
                           "set run.out_dir (or run.name) to a folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(f"run directory {self.run_dir} is in use by another tdlm process (PID {holder}); "
                           f"wait for it to end or stop it (kill -TERM {holder}: it checkpoints first), "
                           "then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self, *, discard_if_empty: bool = False) -> None:
        """Drop the lock; `discard_if_empty`: remove the directory too if the lock file is all it
        holds (a run that failed before writing anything leaves no directory behind)."""
        if self.fd is None:
            return
        if discard_if_empty and [p.name for p in self.run_dir.iterdir()] == [".lock"]:
            (self.run_dir / ".lock").unlink()
            self.run_dir.rmdir()
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None

    def removed(self) -> bool:
        """Whether the lock file was deleted while held: the run directory was removed (rm -rf)
        under the process, and whatever it writes now would land in a new, partial directory."""
        return self.fd is not None and os.fstat(self.fd).st_nlink == 0

    def __del__(self):
        self.release()


def set_aside(run_dir: Path, lock: RunLock | None = None) -> Path:
    """Move a run that died before its first checkpoint to <parent>/.aborted/<name>-<n> (nothing
    is deleted). Refused while another process holds the directory; `lock`: ours, if we hold it."""
    run_dir = Path(run_dir)
    own = lock or RunLock(run_dir)
    try:
        aborted = run_dir.parent / ".aborted"
        aborted.mkdir(parents=True, exist_ok=True)
        n = 1
        while (aborted / f"{run_dir.name}-{n}").exists():
            n += 1
        return run_dir.rename(aborted / f"{run_dir.name}-{n}")
    finally:
        if lock is None:
            own.release()


def discard_leftovers(run_dir: Path) -> None:
    """Remove what writes a kill cut short left (temporary files, checkpoint staging directories):
    never read, they would only take space. Safe only under the run's lock: no one else writes."""
    remove_temporaries(run_dir)
    remove_leftovers(run_dir)


def claim_run_dir(run_dir: Path, *, resume: bool, echo=print) -> RunLock:
    """Lock `run_dir` for a training process and check it can do what was asked: a new run in a
    new directory (one that died before its first checkpoint is set aside into .aborted/ and
    started again), or a resume of a run with a checkpoint. The lock is held on return."""
    run_dir = Path(run_dir)
    if resume and not run_dir.is_dir():
        raise RunError(f"--resume: no checkpoint to resume in {run_dir} (no such run directory); "
                       "start it without --resume")
    lock = RunLock(run_dir)
    try:
        discard_leftovers(run_dir)
        status = run_status(run_dir)
        last = run_dir / "checkpoints" / "last.json"
        if status == "finished" and not last.exists():  # neither a resume nor a new start can use it
            raise RunError(f"run directory {run_dir} holds a finished run whose checkpoints were deleted ({last} "
                           "is missing): it cannot be continued, and it is not overwritten; start a new run "
                           "under another name (--set run.name=<new name>)")
        if resume and not last.exists():
            why = ("it stopped before its first checkpoint; start it again without --resume (the old files go "
                   "to .aborted/)" if status == "aborted" else "start it without --resume")
            raise RunError(f"--resume: no checkpoint to resume in {run_dir} (looked for {last}); {why}")
        if not resume and status in ("finished", "stopped"):
            raise RunError(f"run directory {run_dir} already holds a run; continue it with --resume, "
                           "or start a new one with --set run.name=<new name> (nothing was overwritten)")
        if not resume and status == "aborted":
            moved = set_aside(run_dir, lock)
            lock.release()
            lock = RunLock(run_dir)
            echo(f"tdlm: {run_dir} held a run that stopped before its first checkpoint: moved it to {moved}; "
                 "starting again")
    except BaseException:
        lock.release()
        raise
    return lock
