"""The runs a report reads: each run folder's config, summary and metrics (Run), found under
some folders, and the diffusion/AR twins among them (tdlm.studies.report, tdlm.studies.repetition).

A run is a folder holding config.json (searched recursively, hidden folders skipped); its
final figures come from summary.json and its validation curve from metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tdlm.data.locate import not_a_folder
from tdlm.errors import TdlmError
from tdlm.training.monitor import read_metrics
from tdlm.training.run_lock import run_status

# The config sections two runs may differ in and still be the same experiment for the other
# objective: a diffusion run and its AR twin form one group (one shade in the plots: blue for
# diffusion, red for AR, darker for later groups).
OBJECTIVE_SECTIONS = ("run", "objective", "sampler", "schedule", "corruption")


class ReportError(TdlmError, ValueError):
    """Nothing to report (no run found) or a folder that cannot be read."""


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    summary: dict
    metrics: list[dict] = field(repr=False)

    @property
    def objective(self) -> str:
        return self.config.get("objective", {}).get("name", "?")

    @property
    def is_diffusion(self) -> bool:
        return self.objective != "ar"

    @property
    def status(self) -> str:
        """The run directory's status (tdlm.training.run_lock.STATUSES)."""
        return run_status(self.path)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def tokens_per_step(self) -> int:
        return self.config["training"]["batch_size"] * self.config["data"]["seq_len"]

    @property
    def step(self) -> int:
        if "step" in self.summary:
            return self.summary["step"]
        return max((r["step"] for r in self.metrics), default=0)

    @property
    def tokens_seen(self) -> int:
        return self.summary.get("tokens_seen", self.step * self.tokens_per_step)

    @property
    def epochs(self) -> float | None:
        """summary.json's, else from the `epoch` the trainer logs (step / batches per epoch)."""
        if self.summary.get("epochs") is not None:
            return self.summary["epochs"]
        logged = [r for r in self.metrics if r["kind"] == "train" and r.get("epoch") and r["step"]]
        if not logged or not self.step:
            return None
        return logged[-1]["epoch"] / logged[-1]["step"] * self.step

    @property
    def train_tokens(self) -> int | None:
        """Unique train tokens: summary.json's, else the tokens one epoch visits."""
        if self.summary.get("train_tokens") is not None:
            return self.summary["train_tokens"]
        epochs = self.epochs
        return round(self.tokens_seen / epochs) if epochs else None

    @property
    def parameters(self) -> int | None:
        return self.summary.get("non_embedding_parameters")

    def final(self, split: str) -> dict | None:
        result = self.summary.get(split)
        return result if self.finished and isinstance(result, dict) and "nll_per_token" in result else None

    def curve(self) -> tuple[list[int], list[float]]:
        """The periodic validation figures against tokens seen."""
        records = [r for r in self.metrics if r["kind"] == "val" and "nll_per_token" in r]
        return [r["step"] * self.tokens_per_step for r in records], [r["nll_per_token"] for r in records]

    def key(self, *, without: tuple[str, ...] = ()) -> str:
        """The config minus the objective's sections and the dotted keys in `without`."""
        config = {k: dict(v) if isinstance(v, dict) else v for k, v in self.config.items() if k not in OBJECTIVE_SECTIONS}
        config["seed"] = self.config.get("run", {}).get("seed")
        for dotted in without:
            section, _, name = dotted.partition(".")
            if name:
                config.get(section, {}).pop(name, None)
            else:
                config.pop(section, None)
        return json.dumps(config, sort_keys=True)

    @property
    def group_label(self) -> str:
        """The run's name without the objective in it: diffusion-ep5 and ar-ep5 -> ep5 (and
        "" for runs named just diffusion or ar)."""
        own_word = re.compile(rf"(^|[-_]){re.escape(self.objective)}(?=$|[-_])")  # "from_ar" stays in a diffusion run's name
        return own_word.sub("", Path(self.name).name).strip("-_")

    @property
    def legend_label(self) -> str:
        """What the run is in a legend: its group and objective, each said once."""
        what = f"{self.objective} (NELBO, a bound)" if self.is_diffusion else "ar (exact NLL)"
        return f"{self.group_label}: {what}" if self.group_label else what


# -- finding and reading runs ----------------------------------------------------------------
def find_runs(roots: list[Path], warn=None) -> list[Run]:
    """Every run under `roots`. A run whose files cannot be read is left out and named through
    `warn(line)` (one damaged run never stops the report of the others); without `warn`, its
    ReportError is raised."""
    runs, skipped = [], []
    for root in roots:
        if not root.is_dir():
            raise ReportError(f"{root} {not_a_folder(root)}: give folders that hold runs")
        for folder, subfolders, files in os.walk(root):
            folder = Path(folder)
            if "config.json" in files:
                subfolders.clear()  # a run's own folders (checkpoints, tensorboard) hold no runs
                try:
                    runs.append(read_run(folder, _run_name(folder, root)))
                except ReportError as exc:
                    if warn is None:
                        raise
                    warn(f"tdlm: warning: left out of the report: {exc}")
                    skipped.append(folder)
            else:
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    if not runs:
        found = f" ({len(skipped)} found, none readable)" if skipped else ""
        raise ReportError(f"no runs (folders with a config.json) under {', '.join(map(str, roots))}{found}")
    names = [r.name for r in runs]
    for run in runs:  # the same name under two roots: tell them apart by their full path
        if names.count(run.name) > 1:
            run.name = str(run.path)
    return runs


def read_run(folder: Path, name: str) -> Run:
    """A run's config, summary and metrics; ReportError naming the file that cannot be used."""
    summary_path = folder / "summary.json"
    config = _json_table(folder / "config.json")
    summary = _json_table(summary_path) if summary_path.exists() else {}
    for section, key in (("training", "batch_size"), ("data", "seq_len")):  # what every figure needs
        if not isinstance(config.get(section), dict) or not isinstance(config[section].get(key), int):
            raise ReportError(f"{folder / 'config.json'} lacks {section}.{key}: it is not a tdlm run's config")
    try:
        metrics = read_metrics(folder)
    except (OSError, ValueError, TdlmError) as exc:
        raise ReportError(f"{folder / 'metrics.jsonl'} cannot be read: {exc}") from None
    return Run(folder, name, config, summary, metrics)


def _json_table(path: Path) -> dict:
    """A JSON object from `path`, or ReportError saying why the file cannot be read."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not UTF-8 text (a damaged or foreign file)") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from None
    if not isinstance(table, dict):
        raise ReportError(f"{path} is not a JSON object")
    return table


def _run_name(folder: Path, root: Path) -> str:
    relative = folder.relative_to(root)
    return str(relative) if relative.parts else folder.resolve().name


def sort_runs(runs: list[Run]) -> list[Run]:
    def natural(text: str):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]

    return sorted(runs, key=lambda r: (not r.is_diffusion, r.epochs or 0, r.parameters or 0, natural(r.name)))


# -- diffusion vs AR -------------------------------------------------------------------------
def twins(runs: list[Run]) -> list[tuple[Run, Run]]:
    """(diffusion, AR) twins among `runs`: one run of each objective whose configs agree outside
    the objective's sections (unsorted)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key(), []).append(run)
    found = []
    for members in groups.values():
        diffusion = [r for r in members if r.is_diffusion]
        ar = [r for r in members if not r.is_diffusion]
        if len(diffusion) == 1 and len(ar) == 1:
            found.append((diffusion[0], ar[0]))
    return found
