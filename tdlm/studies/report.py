"""`tdlm report`: every run under some folders as one table (report.md, report.csv) and plots.

A run is a folder holding config.json (searched recursively, hidden folders skipped); its
final figures come from summary.json and its validation curve from metrics.jsonl. Runs that
have not finished are listed with their status and left out of the final-value plots.

Diffusion figures are NELBOs, upper bounds on the model's NLL; AR figures are exact NLLs. So
"the diffusion bound is below AR" is a conclusion about the models, while "AR is below the
diffusion bound" leaves open where the diffusion model's true NLL lies.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tdlm.data.locate import not_a_folder
from tdlm.errors import TdlmError
from tdlm.rundir import run_status
from tdlm.training.monitor import read_metrics

SPLITS = ("valid", "test")
Z95 = 1.96
# The config sections two runs may differ in and still be the same experiment for the other
# objective: a diffusion run and its AR twin form one group (one shade in the plots: blue for
# diffusion, red for AR, darker for later groups).
OBJECTIVE_SECTIONS = ("run", "objective", "sampler", "schedule", "corruption")


class ReportError(ValueError):
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
        """The run directory's status (tdlm.rundir.STATUSES)."""
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


# -- the table -------------------------------------------------------------------------------
def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Markdown table cells; a split's columns appear only when some run has figures for it."""
    splits = [s for s in SPLITS if any(r.final(s) for r in runs)]
    header = ["run", "objective", "status", "non-emb params", "unique train tokens", "tokens seen", "epochs"]
    for split in splits:
        header += [f"{split} NELBO / NLL", f"{split} ppl", f"{split} bits/byte"]
    header.append("wall time")
    rows = []
    for run in runs:
        row = [run.name, run.objective, run.status, _count(run.parameters), _count(run.train_tokens),
               _count(run.tokens_seen), _number(run.epochs)]
        for split in splits:
            result = run.final(split)
            if result is None:
                row += ["-", "-", "-"]
                continue
            bound = result.get("is_bound", run.is_diffusion)
            stderr = result.get("stderr")
            row += [f"{result['nll_per_token']:.3f} ± " + ("?" if stderr is None else f"{stderr:.3f}"),
                    ("<= " if bound else "") + f"{result['ppl']:.1f}", f"{result.get('bits_per_byte', float('nan')):.3f}"]
        row.append(_duration(run.summary.get("wall_time_s")))
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def csv_text(runs: list[Run]) -> str:
    columns = ["run", "path", "objective", "status", "step", "total_steps", "non_embedding_parameters", "parameters",
               "train_tokens", "tokens_seen", "epochs", "flops_per_token", "mfu", "device", "processes", "wall_time_s"]
    for split in SPLITS:
        columns += [f"{split}_{k}" for k in ("nll_per_token", "stderr", "ppl", "is_bound", "bits_per_byte", "tokens")]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        row = {"run": run.name, "path": str(run.path), "objective": run.objective, "status": run.status,
               "step": run.step, "non_embedding_parameters": run.parameters, "train_tokens": run.train_tokens,
               "tokens_seen": run.tokens_seen, "epochs": run.epochs}
        row.update({k: run.summary.get(k) for k in ("total_steps", "parameters", "flops_per_token", "mfu", "device",
                                                     "processes", "wall_time_s")})
        for split in SPLITS:
            result = run.final(split) or {}
            row.update({f"{split}_{k}": result.get(k) for k in ("nll_per_token", "stderr", "ppl", "is_bound",
                                                                 "bits_per_byte", "tokens")})
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


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


def pairs(runs: list[Run], split: str) -> list[tuple[Run, Run]]:
    """Twins among the finished runs with final figures on `split`."""
    found = twins([run for run in runs if run.final(split)])
    return sorted(found, key=lambda p: (p[0].epochs or 0, p[0].parameters or 0, p[0].name))


def compared_pairs(runs: list[Run]) -> list[tuple[Run, Run, str]]:
    """(diffusion, AR, split) for every twin pair that has figures to compare: on the test split
    when both have test figures, else on valid. A run without final figures (e.g. eval.final_splits
    = []) is left out of the comparison, not the comparison out of the report."""
    found, paired = [], set()
    for split in ("test", "valid"):
        for diffusion, ar in pairs(runs, split):
            if diffusion.path not in paired and ar.path not in paired:
                found.append((diffusion, ar, split))
                paired |= {diffusion.path, ar.path}
    return sorted(found, key=lambda p: (p[0].epochs or 0, p[0].parameters or 0, p[0].name))


def comparison_lines(runs: list[Run]) -> list[str]:
    """Per diffusion/AR pair: the gap, with its standard error, in honest words; then the answer."""
    found = compared_pairs(runs)
    if not found:
        return ["No finished diffusion run with final figures has a finished AR twin with figures on the same split "
                "(same config but the objective), so there is no diffusion-vs-AR comparison."]
    splits = sorted({split for *_, split in found}, key=("test", "valid").index)
    where = f"the {splits[0]} split" if len(splits) == 1 else "the test split (valid where a pair has no test figures)"
    lines = [f"Diffusion vs AR on {where} (AR exact NLL minus diffusion NELBO, nats/token, "
             "± one standard error of the difference; the NELBO is an upper bound on the diffusion model's NLL):", ""]
    overtakes = []
    for diffusion, ar, split in found:
        d, a = diffusion.final(split), ar.final(split)
        gap = a["nll_per_token"] - d["nll_per_token"]
        se = math.hypot(_stderr(d), _stderr(a))
        where = f"{_epochs(diffusion.epochs)}, {_count(diffusion.parameters)} params ({diffusion.group_label})"
        where += f" [{split}]" if len(splits) > 1 else ""
        if math.isnan(se):
            verdict = "a standard error is unknown (one sequence scored): no difference can be shown"
        elif gap > 2 * se:
            verdict = "the diffusion bound is lower, so the diffusion model is better"
            overtakes.append(diffusion)
        elif gap < -2 * se:
            verdict = "AR is lower than the diffusion bound (the diffusion NLL itself may be lower than its bound)"
        else:
            verdict = "within two standard errors: no difference shown"
        lines.append(f"- {where}: AR {a['nll_per_token']:.3f} vs diffusion <= {d['nll_per_token']:.3f}; "
                     f"gap {gap:+.3f} ± {'?' if math.isnan(se) else f'{se:.3f}'}: {verdict}.")
    epochs = sorted({round(d.epochs, 3) for d, *_ in found if d.epochs})
    if len(epochs) > 1:
        tried = ", ".join(_number(e) for e in epochs)
        if overtakes:
            first = min(d.epochs for d in overtakes)
            answer = (f"the diffusion bound is below AR's NLL (by more than two standard errors) first at "
                      f"{_epochs(first)}, of {tried}.")
        else:
            answer = (f"at none of the epoch counts run ({tried}) is the diffusion bound below AR's NLL by more "
                      "than two standard errors.")
        lines += ["", f"**At which number of epochs does the diffusion bound overtake AR?** {answer}"]
    return lines


# -- plots -----------------------------------------------------------------------------------
def plot_curves(runs: list[Run], path: Path) -> Path | None:
    """Validation NELBO / NLL against tokens seen: a colour per group, diffusion dashed."""
    drawn = [r for r in runs if r.curve()[0]]
    if not drawn:
        return None
    plt = _pyplot()
    colours = run_colours(drawn)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in drawn:
        tokens, nll = run.curve()
        ax.plot(tokens, nll, linestyle="--" if run.is_diffusion else "-", marker=".", color=colours[run.name],
                label=run.legend_label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("nats / token")
    ax.set_title("Validation NELBO (diffusion, dashed: an upper bound) and NLL (AR, solid)\n"
                 "periodic evaluations on the recipe's eval_sequences", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(drawn) > 8 else 1, loc="upper right")
    return _save(fig, path, plt)


def plot_final(runs: list[Run], path: Path, *, x: str) -> Path | None:
    """Final figures (95% intervals) against epochs or non-embedding parameters, log x, one
    panel per split; a line per objective (and per remaining config difference)."""
    value = {"epochs": lambda r: r.epochs, "parameters": lambda r: r.parameters}[x]
    finished = [r for r in runs if r.finished and value(r)]
    splits = [s for s in SPLITS if any(r.final(s) for r in finished)]
    without = ("data.max_train_tokens", "training.epochs", "training.max_steps") if x == "epochs" else ("model",)
    series: dict[tuple[str, str], list[Run]] = {}
    for run in finished:
        series.setdefault((run.objective, run.key(without=without)), []).append(run)
    if not splits or all(len({value(r) for r in members}) < 2 for members in series.values()):
        return None  # no line to draw: nothing varies along x within a series
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.5), squeeze=False)
    # A series is one line: its first run stands for it in the colours and the legend.
    colours = run_colours([members[0] for _, members in sorted(series.items())])
    for ax, split in zip(axes[0], splits):
        for (objective, key), members in sorted(series.items()):
            points = sorted((value(r), r.final(split)) for r in members if r.final(split))
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [p[1]["nll_per_token"] for p in points]
            errors = [Z95 * _stderr(p[1]) for p in points]  # unknown: no bar drawn, rather than a 0 one
            label = objective + (" (NELBO, a bound)" if objective != "ar" else " (exact NLL)")
            label += f" [{series_label(members)}]" if len(series) > len({o for o, _ in series}) else ""
            ax.errorbar(xs, ys, yerr=errors, capsize=3, marker="o" if objective != "ar" else "s",
                        linestyle="--" if objective != "ar" else "-", color=colours[members[0].name], label=label)
        ax.set_xscale("log")
        ticks = spaced_ticks(sorted({value(r) for r in finished}))  # label the values run, not powers of ten
        ax.set_xticks(ticks, [_number(t) if x == "epochs" else _count(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("epochs (passes over the unique train tokens)" if x == "epochs" else "non-embedding parameters")
        ax.set_ylabel(f"final {split} nats / token")
        ax.set_title(f"{split}: diffusion NELBO vs AR NLL, 95% intervals", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, path, plt)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_colours(runs: list[Run]) -> dict[str, tuple]:
    """A colour per run name: blue shades for diffusion, red shades for AR, one shade per group
    (twins share the shade, not the hue), darker for later groups, so both the objective and
    the order of a sweep can be read off a line."""
    from matplotlib import colormaps

    groups = list(dict.fromkeys(r.key() for r in runs))
    shade = {key: 0.85 if len(groups) == 1 else 0.4 + 0.55 * i / (len(groups) - 1) for i, key in enumerate(groups)}
    return {r.name: tuple(colormaps["Blues" if r.is_diffusion else "Reds"](shade[r.key()])) for r in runs}


def series_label(members: list[Run]) -> str:
    """A final-value line's name: its runs' common group name (their names without the
    objective and without what varies along the line)."""
    labels = sorted({r.group_label for r in members})
    return (labels[0] if len(labels) == 1 else os.path.commonprefix(labels).rstrip("-_")) or "runs"


def spaced_ticks(values: list[float], *, min_ratio: float = 1.25) -> list[float]:
    """Tick positions on a log axis, dropping a value too close to the previous kept one for
    its label to fit beside it (the first and the last are always kept)."""
    if len(values) <= 2:
        return values
    kept = [values[0]]
    for value in values[1:-1]:
        if value / kept[-1] >= min_ratio and values[-1] / value >= min_ratio:
            kept.append(value)
    return kept + [values[-1]]


# -- the whole report ------------------------------------------------------------------------
def write_report(roots: list[Path], out_dir: Path, warn=None) -> tuple[str, list[Path]]:
    """Write report.md, report.csv and the PNGs into out_dir; returns the markdown and the paths.
    `warn(line)`: where runs that cannot be read are named (they are left out); see find_runs."""
    from tdlm.studies import repetition

    runs = sort_runs(find_runs(roots, warn))
    out_dir.mkdir(parents=True, exist_ok=True)
    twins = compared_pairs(runs)
    plots = [p for p in (plot_curves(runs, out_dir / "valid_curves.png"),
                         plot_final(runs, out_dir / "final_vs_epochs.png", x="epochs"),
                         plot_final(runs, out_dir / "final_vs_parameters.png", x="parameters"),
                         repetition.plot_repetition(runs, out_dir / "repetition.png"),
                         repetition.plot_gap(runs, out_dir / "gap_vs_epochs.png", x="epochs", pairs_=twins),
                         repetition.plot_gap(runs, out_dir / "gap_vs_parameters.png", x="parameters", pairs_=twins))
             if p]
    unfinished = [r.name for r in runs if not r.finished]
    parts = [f"# tdlm report: {len(runs)} runs under {', '.join(map(str, roots))}", "",
             markdown_table(*table_rows(runs)), "",
             "NELBO / NLL in nats per token ± standard error; `<=` marks a perplexity bound (diffusion)."
             + (" Unique train tokens and epochs are estimated from the logged epoch where summary.json lacks them."
                if any(r.summary.get("train_tokens") is None for r in runs) else ""), ""]
    if unfinished:
        parts += [f"Not finished (left out of the final-value plots): {', '.join(unfinished)}.", ""]
    parts += comparison_lines(runs) + [""] + repetition.repetition_lines(runs)
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    markdown = "\n".join(parts).rstrip() + "\n"
    (out_dir / "report.md").write_text(markdown)
    (out_dir / "report.csv").write_text(csv_text(runs))
    return markdown, [out_dir / "report.md", out_dir / "report.csv", *plots]


def _stderr(result: dict) -> float:
    """A result's standard error; NaN where it is unknown (one sequence scored: evaluate gives None)."""
    stderr = result.get("stderr", 0.0)
    return math.nan if stderr is None else stderr


def _count(value) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return str(value)


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _epochs(value) -> str:
    return f"{_number(value)} epoch" + ("" if value == 1 else "s")


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
