"""Sweeps: base recipes crossed with a grid of overrides, every run validated before any starts.

A sweep file (recipes/sweeps/*.toml):

    [sweep]
    name = "epochs_wikitext2"        # runs go to <out_dir>/<name>/<run name>
    bases = ["../tiny_wikitext2.toml", "../tiny_wikitext2_ar.toml"]   # or base = "...";
    out_dir = "runs"                 # paths relative to the sweep file; out_dir to the cwd

    [fixed]                          # overrides of every run (the keys of `tdlm run --set`)
    "training.max_steps" = 1400

    [grid]                           # cartesian product: key -> list of values
    "training.lr" = [3e-4, 1e-3]

    [[zip]]                          # keys varied together (lists of one length), crossed
    labels = ["ep5", "ep20"]         # with the grid; optional names of its points
    "data.max_train_tokens" = [2293760, 573440]

A run's name joins the base's label (its objective, when the bases differ in it, else the
file's stem; left out for a single base), one label per grid key (`lr0.001`) and one per zip
(its label, or its keys' labels), e.g. `ar-lr0.001-ep20`. Every run's recipe is read with its
overrides and its components resolved at load time, so a typo fails before anything runs.

A run's status is tdlm.training.run_lock's: finished (skipped), stopped (it has a checkpoint: it
goes on with --resume), aborted (it started but died before its first checkpoint: that directory
is moved to <out_dir>/<name>/.aborted/ and the run starts again) or new.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tdlm.config import (
    RecipeError,
    RunConfig,
    flatten_table,
    format_validation_error,
    read_recipe,
    read_toml,
    resolve_components,
    toml_value,
)
from tdlm.errors import TdlmError
from tdlm.files import write_atomically
from tdlm.training.run_lock import run_status, set_aside

SLURM_TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm_array.sh"
RESERVED_KEYS = ("run.name", "run.out_dir")  # the sweep sets these itself
SHORT_KEYS = {"max_train_tokens": "tokens", "max_steps": "steps", "n_layers": "L", "d_model": "d",
              "n_heads": "h", "batch_size": "bs", "seq_len": "len", "name": ""}
GPT2_VOCAB = 50257
SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]+")  # run names are directory names


class SweepError(TdlmError, ValueError):
    """A sweep file that cannot run: the message says which key, run or file and why."""


class SweepSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """Runs go to <out_dir>/<name>/<run name>."""
    base: str | None = None
    """One base recipe, relative to the sweep file."""
    bases: list[str] | None = None
    """Several base recipes crossed with the grid (e.g. a diffusion recipe and its AR twin)."""
    out_dir: str = "runs"

    @model_validator(mode="after")
    def _one_kind_of_base(self) -> SweepSection:
        if (self.base is None) == (self.bases is None):
            raise ValueError("give exactly one of base = '...' or bases = [...]")
        if self.bases is not None and not self.bases:
            raise ValueError("bases is empty")
        if not SAFE_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits and . _ + -")
        return self


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sweep: SweepSection
    fixed: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    zip: list[dict[str, list[Any]]] = []


@dataclass(frozen=True)
class SweepRun:
    name: str
    base: Path
    varied: tuple[str, ...]
    """The overrides that make this run differ from the others ("key=value", values in TOML)."""
    overrides: tuple[str, ...]
    """Everything passed to `tdlm run --set`: fixed, varied, then run.out_dir and run.name."""
    run_dir: Path
    cfg: RunConfig
    non_embedding_parameters: int | None


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    out_dir: Path
    fixed: tuple[str, ...]
    runs: list[SweepRun]

    def select(self, patterns: tuple[str, ...] = ()) -> list[SweepRun]:
        """The runs whose names match any glob in `patterns` (all runs when there are none)."""
        if not patterns:
            return list(self.runs)
        chosen = [r for r in self.runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
        if not chosen:
            raise SweepError(f"--only {' '.join(patterns)} matches no run of {self.name} "
                             f"(runs: {', '.join(r.name for r in self.runs)})")
        return chosen


# -- reading and expanding ------------------------------------------------------------------
def load_sweep(path: str | Path, registry=None) -> Sweep:
    """Read a sweep file, expand it into runs and validate every run's resolved recipe."""
    from tdlm.registry import build_registry

    path = Path(path)
    raw = read_toml(path, SweepError, f"sweep file {str(path)!r} not found (sweeps ship in recipes/sweeps/)")
    spec = _validate_spec(raw, path)
    registry = registry or build_registry()
    bases = [path.parent / b for b in ([spec.sweep.base] if spec.sweep.base else spec.sweep.bases)]
    for base in bases:
        if not base.is_file():
            raise SweepError(f"{path}: base recipe {str(base)!r} not found (bases are relative to the sweep file)")
    out_dir = Path(spec.sweep.out_dir) / spec.sweep.name
    fixed = tuple(f"{k}={toml_value(v)}" for k, v in spec.fixed.items())
    base_labels = _base_labels(bases)
    runs, seen = [], {}
    for base, points in itertools.product(bases, itertools.product(*_axes(spec))):
        name = "-".join(part for part in [base_labels[base], *(label for label, _ in points)] if part)
        name = name or spec.sweep.name
        if not SAFE_NAME.fullmatch(name):
            raise SweepError(f"{path}: run name {name!r} may hold only letters, digits and . _ + - (check the labels)")
        if name in seen:
            raise SweepError(f"{path}: two runs would be named {name!r} ({seen[name]} and {', '.join(_flat(points))}); "
                             "give the [[zip]] labels or vary the grid")
        seen[name] = ", ".join(_flat(points)) or "no overrides"
        varied = tuple(_flat(points))
        overrides = (*fixed, *varied, f"run.out_dir={toml_value(str(out_dir))}", f"run.name={toml_value(name)}")
        cfg = _check_run(name, base, overrides, registry)
        runs.append(SweepRun(name, base, varied, overrides, out_dir / name, cfg, _parameters(cfg)))
    return Sweep(spec.sweep.name, path, out_dir, fixed, runs)


def _validate_spec(raw: dict, path: Path) -> SweepFile:
    raw = dict(raw)
    for table in ("fixed", "grid"):  # unquoted dotted keys (training.lr = ...) arrive nested
        if isinstance(raw.get(table), dict):
            raw[table] = flatten_table(raw[table])
    if isinstance(raw.get("zip"), list):
        raw["zip"] = [flatten_table(z) if isinstance(z, dict) else z for z in raw["zip"]]
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as exc:
        raise SweepError(f"{path}: {format_validation_error(exc, SweepFile)}") from exc
    keys = [*spec.fixed, *spec.grid, *(k for z in spec.zip for k in z if k != "labels")]
    for key in keys:
        if key.count(".") < 1:
            raise SweepError(f"{path}: key {key!r} is not of the form section.key (e.g. training.max_steps)")
        if key in RESERVED_KEYS:
            raise SweepError(f"{path}: {key} is set by the sweep ([sweep] name and out_dir); leave it out")
    if len(keys) != len(set(keys)):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise SweepError(f"{path}: {', '.join(twice)} set in more than one of [fixed], [grid] and [[zip]]")
    for key, values in spec.grid.items():
        if not values:
            raise SweepError(f"{path}: grid key {key!r} has no values")
    for i, axis in enumerate(spec.zip):
        lengths = {k: len(v) for k, v in axis.items()}
        if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
            raise SweepError(f"{path}: [[zip]] number {i + 1}: its lists differ in length or are empty ({lengths})")
        if set(axis) == {"labels"}:
            raise SweepError(f"{path}: [[zip]] number {i + 1} has labels but no keys")
    return spec


def _axes(spec: SweepFile) -> list[list[tuple[str, list[tuple[str, Any]]]]]:
    """One list per axis (each grid key, each zip) of its points: (label, [(key, value), ...])."""
    axes = [[(_label(key, value), [(key, value)]) for value in values] for key, values in spec.grid.items()]
    for axis in spec.zip:
        keys = [k for k in axis if k != "labels"]
        points = list(zip(*(axis[k] for k in keys)))
        labels = axis.get("labels") or ["-".join(_label(k, v) for k, v in zip(keys, p)) for p in points]
        axes.append([(str(label), list(zip(keys, point))) for label, point in zip(labels, points)])
    return axes


def _flat(points) -> list[str]:
    return [f"{key}={toml_value(value)}" for _, pairs in points for key, value in pairs]


def _label(key: str, value: Any) -> str:
    """'training.lr', 0.001 -> 'lr0.001'; 'data.max_train_tokens', 204800 -> 'tokens205k'."""
    last = key.rsplit(".", 1)[-1]
    prefix = SHORT_KEYS.get(last, last.replace("_", ""))
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int) and abs(value) >= 10_000:
        text = _short_number(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "", prefix + text)


def _short_number(value: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        text = f"{value / scale:.3g}"
        if abs(value) >= scale and "e" not in text:  # 999,999 is not "1e+03k"
            return text + suffix
    return str(value)


def _base_labels(bases: list[Path]) -> dict[Path, str]:
    """Nothing for one base; the objective when it tells the bases apart, else the file stem."""
    if len(bases) == 1:
        return {bases[0]: ""}
    objectives = {}
    for base in bases:
        try:
            objectives[base] = read_recipe(base).objective.name
        except RecipeError as exc:
            raise SweepError(str(exc)) from exc
    if len(set(objectives.values())) == len(bases):
        return objectives
    if len({b.stem for b in bases}) != len(bases):
        raise SweepError(f"bases {', '.join(map(str, bases))} share a file name and an objective: rename one")
    return {base: base.stem for base in bases}


def _check_run(name: str, base: Path, overrides: tuple[str, ...], registry) -> RunConfig:
    from tdlm.registry import PluginError

    try:
        cfg = read_recipe(base, overrides)
        resolve_components(cfg, registry)
    except (RecipeError, PluginError) as exc:
        raise SweepError(f"run {name!r}: {exc}") from exc
    if cfg.model.d_model % cfg.model.n_heads:
        raise SweepError(f"run {name!r}: model.d_model ({cfg.model.d_model}) must be divisible by "
                         f"model.n_heads ({cfg.model.n_heads})")
    return cfg


def _parameters(cfg: RunConfig) -> int | None:
    """Non-embedding parameters of the run's network, built on the meta device (no memory)."""
    import torch

    from tdlm.model import Transformer

    vocab = {"gpt2": GPT2_VOCAB, "bpe": cfg.data.bpe_vocab_size}.get(cfg.data.tokenizer)
    if vocab is None:
        return None
    with torch.device("meta"):
        net = Transformer(cfg.model, vocab_size=vocab, max_len=cfg.data.seq_len, causal=False)
    return net.num_parameters(non_embedding=True)


def format_plan(sweep: Sweep, runs: list[SweepRun]) -> str:
    """The dry-run table: one row per run with its status, size and overrides."""
    lines = [f"sweep {sweep.name}: {len(runs)} runs -> {sweep.out_dir}/"]
    if sweep.fixed:
        lines.append(f"fixed: {' '.join(sweep.fixed)}")
    rows = [("run", "status", "non-emb params", "base", "overrides")]
    for run in runs:
        params = f"{run.non_embedding_parameters / 1e6:.2f}M" if run.non_embedding_parameters else "?"
        rows.append((run.name, run_status(run.run_dir), params, _display_path(run.base), " ".join(run.varied)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.append("status: finished (skipped), stopped (resumed), aborted (set aside in .aborted/, started again), new")
    return "\n".join(lines)


# -- running --------------------------------------------------------------------------------
def run_arguments(run: SweepRun, *, resume: bool = False) -> list[str]:
    """The arguments after `tdlm run` that train this run."""
    args = [_display_path(run.base)]
    for override in run.overrides:
        args += ["--set", override]
    return args + (["--resume"] if resume else [])


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM reached the sweep: the current run checkpointed and stopped."""


def subprocess_runner(args: list[str]) -> int:
    """`python -m tdlm run ARGS` in a child process; a crash there does not end the sweep.

    The child receives Ctrl-C along with us (same process group) and needs time to finish its
    step and write a checkpoint, so we keep waiting for it, then stop the sweep. A SIGTERM sent
    to us alone is passed on to it once.
    """
    child = subprocess.Popen([sys.executable, "-m", "tdlm", "run", *args])
    interrupted = False

    def forward(signum, frame):
        nonlocal interrupted
        interrupted = True
        child.send_signal(signum)

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if interrupted:
        raise SweepInterrupted
    return code


def new_outcome() -> dict[str, list[str]]:
    return {"finished": [], "skipped": [], "failed": [], "stopped": []}


def prepare_run(run: SweepRun, tag: str, outcome: dict, echo) -> list[str] | None:
    """The `tdlm run` arguments that take `run` on from its status (None: finished, skipped);
    a run that died before its first checkpoint is set aside first."""
    status = run_status(run.run_dir)
    if status == "finished":
        echo(f"{tag} {run.name}: finished already, skipped")
        outcome["skipped"].append(run.name)
        return None
    if status == "aborted":
        moved = set_aside(run.run_dir)
        echo(f"{tag} {run.name}: died before its first checkpoint; moved to {moved}, starting again")
    args = run_arguments(run, resume=status == "stopped")
    echo(f"{tag} {run.name}: tdlm run {shlex.join(args)}")
    return args


def run_sweep(runs: list[SweepRun], *, runner: Callable[[list[str]], int] | None = None,
              echo: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Train the runs one after the other: skip finished ones, resume stopped ones.

    `runner(args)` trains one run from the arguments of `tdlm run` and returns its exit code
    (default: subprocess_runner). Returns {"finished", "skipped", "failed", "stopped"} -> run
    names; a failure is reported and the sweep goes on with the next run.
    """
    runner = runner or subprocess_runner
    outcome = new_outcome()
    for i, run in enumerate(runs, 1):
        args = prepare_run(run, f"[{i}/{len(runs)}]", outcome, echo)
        if args is None:
            continue
        try:
            code = runner(args)
        except SweepInterrupted:
            outcome["stopped"].append(run.name)
            echo(f"sweep interrupted during {run.name}; run the same command again to go on")
            break
        if code != 0:
            outcome["failed"].append(run.name)
            echo(f"[{i}/{len(runs)}] {run.name}: failed (exit code {code}); going on with the next run")
        elif run_status(run.run_dir) == "finished":
            outcome["finished"].append(run.name)
        else:  # stopped on purpose (a signal sent to the run alone): not a failure, not done
            outcome["stopped"].append(run.name)
    return outcome


# -- launch commands for other machines ------------------------------------------------------
def accelerate_commands(runs: list[SweepRun], launch_config: str) -> list[str]:
    """One `accelerate launch` line per run; finished runs as comments, stopped ones resume."""
    lines = []
    for run in runs:
        status = run_status(run.run_dir)
        args = run_arguments(run, resume=status == "stopped")
        line = shlex.join(["accelerate", "launch", "--config_file", launch_config, "-m", "tdlm", "run", *args])
        lines.append(f"# finished: {line}" if status == "finished" else line)
    return lines


def slurm_script(sweep: Sweep, runs: list[SweepRun], *, launch_config: str, gpus: int, time_limit: str,
                 template: Path = SLURM_TEMPLATE) -> tuple[Path, Path]:
    """Write <out_dir>/launch/commands.tsv (a run directory and its `tdlm run` arguments per
    line) and the SLURM array script filled in from `template`; returns both paths."""
    if not template.is_file():
        raise SweepError(f"SLURM template {template} not found (it ships as launch/slurm_array.sh)")
    folder = sweep.out_dir.resolve() / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    commands = folder / "commands.tsv"
    write_atomically(commands, "".join(f"{run.run_dir}\t{shlex.join(run_arguments(run))}\n" for run in runs))
    values = {
        "JOB_NAME": sweep.name, "LAST_INDEX": str(len(runs) - 1), "GPUS": str(gpus), "TIME": time_limit,
        "LOG_DIR": str(folder / "logs"), "WORKDIR": os.getcwd(), "BIN_DIR": str(Path(sys.executable).parent),
        "COMMANDS": str(commands), "LAUNCH_CONFIG": launch_config,
    }
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if missing := sorted(set(re.findall(r"@@([A-Z_]+)@@", text))):
        raise SweepError(f"{template}: no value for placeholder(s) {', '.join(missing)}")
    (folder / "logs").mkdir(exist_ok=True)
    script = folder / "slurm_array.sh"
    write_atomically(script, text)
    script.chmod(0o755)
    return script, commands


def _display_path(path: Path) -> str:
    """Relative to the working directory when it is below it (shorter commands), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(path).resolve())
