"""`tdlm report`: every run under some folders as one table (report.md, report.csv) and plots.

The runs are read by tdlm.studies.runs, the crossover analysis is tdlm.studies.repetition, and
this module writes the report from them. Runs that have not finished are listed with their
status and left out of the final-value plots.

Diffusion figures are NELBOs, upper bounds on the model's NLL; AR figures are exact NLLs. So
"the diffusion bound is below AR" is a conclusion about the models, while "AR is below the
diffusion bound" leaves open where the diffusion model's true NLL lies.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from tdlm.files import write_atomically
from tdlm.studies.figures import format_count, format_number, pyplot, save_figure
from tdlm.studies.runs import (  # noqa: F401 - find_runs, Run and ReportError were defined here: still importable
    ReportError,
    Run,
    find_runs,
    read_run,
    sort_runs,
    twins,
)

SPLITS = ("valid", "test")
Z95 = 1.96


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
        row = [run.name, run.objective, run.status, format_count(run.parameters), format_count(run.train_tokens),
               format_count(run.tokens_seen), format_number(run.epochs)]
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
        where = f"{_epochs(diffusion.epochs)}, {format_count(diffusion.parameters)} params ({diffusion.group_label})"
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
        tried = ", ".join(format_number(e) for e in epochs)
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
    plt = pyplot()
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
    return save_figure(fig, path, plt)


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
    plt = pyplot()
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
        ax.set_xticks(ticks, [format_number(t) if x == "epochs" else format_count(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("epochs (passes over the unique train tokens)" if x == "epochs" else "non-embedding parameters")
        ax.set_ylabel(f"final {split} nats / token")
        ax.set_title(f"{split}: diffusion NELBO vs AR NLL, 95% intervals", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path, plt)


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
    write_atomically(out_dir / "report.md", markdown)
    write_atomically(out_dir / "report.csv", csv_text(runs))
    return markdown, [out_dir / "report.md", out_dir / "report.csv", *plots]


def _stderr(result: dict) -> float:
    """A result's standard error; NaN where it is unknown (one sequence scored: evaluate gives None)."""
    stderr = result.get("stderr", 0.0)
    return math.nan if stderr is None else stderr


def _epochs(value) -> str:
    return f"{format_number(value)} epoch" + ("" if value == 1 else "s")


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
