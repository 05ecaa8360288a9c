"""`tdlm sweep FILE --jobs N`: N runs of a sweep at once, each its own `tdlm run` process.

A run does the same arithmetic whichever way it is started; only the torch threads differ. On
a CPU the cores are split between the jobs (OMP_NUM_THREADS, which torch reads at import, set
to max(1, cores // N) per child), so N jobs do not fight over the same cores; on one GPU the
jobs share the device. Each child writes its output to <sweep out_dir>/.logs/<run>.log (N
interleaved progress bars would be unreadable) and the sweep prints a line whenever a run
starts or ends, with what is running and what waits.

Signals: the children run in process groups of their own, so a Ctrl-C at the terminal reaches
the sweep alone, which passes exactly one SIGINT to each running child (a second one would
stop a run without its checkpoint), starts nothing new and waits for every child to save and
stop. SIGTERM is passed on the same way. A failed run does not stop the others; it is
reported at the end with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tdlm.training.run_lock import run_status
from tdlm.studies.sweep import SweepRun, new_outcome, prepare_run

POLL_SECONDS = 0.2
LOG_TAIL_LINES = 15


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_environment(jobs: int, cores: int | None = None, base: dict | None = None) -> dict[str, str]:
    """The environment of each of `jobs` concurrent runs: torch's CPU threads split between them
    (an OMP_NUM_THREADS already set lower is kept), and progress bars that update their log
    file every 30 s rather than many times a second."""
    env = dict(os.environ if base is None else base)
    threads = max(1, (cores or usable_cores()) // jobs)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, min(threads, int(env["OMP_NUM_THREADS"])))
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TQDM_MININTERVAL", "30")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_child(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`python -m tdlm run ARGS` in its own process group, output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "tdlm", "run", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


@dataclass
class _Job:
    run: SweepRun
    process: subprocess.Popen
    log: Path
    started: float


def run_sweep_jobs(runs: list[SweepRun], jobs: int, log_dir: Path, *,
                   start: Callable[[list[str], Path, dict], subprocess.Popen] | None = None,
                   echo: Callable[[str], None] = print, cores: int | None = None) -> dict[str, list[str]]:
    """Train the runs `jobs` at a time; returns run_sweep's {"finished", "skipped", "failed",
    "stopped"} -> names, in the order the runs ended. `start(args, log, env)` starts one child."""
    start = start or start_child
    outcome = new_outcome()
    waiting = deque()
    for i, run in enumerate(runs, 1):
        args = prepare_run(run, f"[{i}/{len(runs)}]", outcome, echo)
        if args is not None:
            waiting.append((run, args))
    env = job_environment(jobs, cores)
    if waiting:
        echo(f"{len(waiting)} run(s), {jobs} at a time, {env['OMP_NUM_THREADS']} torch thread(s) each; "
             f"their output goes to {log_dir}/<run>.log")
    running: dict[str, _Job] = {}
    signals: list[int] = []  # received and not yet passed on

    def on_signal(signum, frame):
        signals.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: leave signals alone
            pass
    interrupted = False
    try:
        while waiting or running:
            while signals:  # each child hears each signal once: the first makes it checkpoint and stop
                signum = signals.pop(0)
                interrupted = True
                echo(f"sweep: {signal.Signals(signum).name} received; the running runs save a checkpoint and stop, "
                     "no new run starts")
                for job in running.values():
                    if job.process.poll() is None:
                        job.process.send_signal(signum)
            while waiting and len(running) < jobs and not interrupted:
                run, args = waiting.popleft()
                log = log_dir / f"{run.name}.log"
                running[run.name] = _Job(run, start(args, log, env), log, time.monotonic())
                echo(f"started {run.name}" + _state(running, waiting, outcome))
            for name, job in list(running.items()):
                code = job.process.poll()
                if code is None:
                    continue
                del running[name]
                took = f"{time.monotonic() - job.started:.0f} s"
                if code != 0:
                    outcome["failed"].append(name)
                    echo(f"failed {name} (exit code {code}, {took}; log: {job.log})" + _state(running, waiting, outcome))
                elif run_status(job.run.run_dir) == "finished":
                    outcome["finished"].append(name)
                    echo(f"finished {name} ({took})" + _state(running, waiting, outcome))
                else:
                    outcome["stopped"].append(name)
                    echo(f"stopped {name} with a checkpoint ({took})" + _state(running, waiting, outcome))
            if running:
                time.sleep(POLL_SECONDS)
            if interrupted and not running:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for name in outcome["failed"]:
        echo(f"--- last lines of {log_dir / (name + '.log')}:\n{_tail(log_dir / (name + '.log'))}")
    if interrupted:
        echo("sweep interrupted; run the same command again to go on (stopped runs resume, the others start)")
    return outcome


def _state(running: dict, waiting, outcome: dict) -> str:
    done = len(outcome["finished"]) + len(outcome["failed"]) + len(outcome["stopped"])
    return (f" | running: {', '.join(running) or 'none'} | waiting: {len(waiting)} | ended: {done}"
            + (f" ({len(outcome['failed'])} failed)" if outcome["failed"] else ""))


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join([line for line in lines if line.strip()][-LOG_TAIL_LINES:])
