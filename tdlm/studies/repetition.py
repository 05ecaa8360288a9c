"""Diffusion vs AR as data repeats: the crossover analysis of `tdlm report`.

For each twin pair (a diffusion run and an AR run whose configs agree outside the objective),
trained for many epochs over the same U unique train tokens:

- each objective's best validation figure so far, against training compute (FLOPs per token
  from summary.json times the tokens seen at that evaluation). "Best so far" is what early
  stopping on validation would have kept: AR overfits when its data repeats, so its last
  figure is not its best;
- the crossover: the first evaluation at which the diffusion bound (best so far) is below AR's
  NLL (best so far) by more than two standard errors of the difference. The diffusion figure is
  an upper bound (NELBO), so a crossover is a conclusion about the models; no crossover leaves
  open where the diffusion model's own NLL lies;
- beside it, the critical compute that Prabhudesai et al. (2025) fit to their runs,
  C_crit(U) = 2.12e15 * U^2.174 FLOPs with U in millions of unique tokens, past which diffusion
  is predicted to overtake AR. Their fit comes from larger models and data; at tdlm's sizes it
  is an extrapolation, printed to be tested, not trusted.

The best-so-far minimum of noisy evaluations is biased low a little for both objectives alike;
the comparison uses the standard errors of the two evaluations it picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tdlm.studies.figures import format_count, format_number, pyplot, save_figure
from tdlm.studies.runs import Run, twins

C_CRIT_SCALE, C_CRIT_EXPONENT = 2.12e15, 2.174


def c_crit(unique_tokens: int) -> float:
    """The fitted critical compute (FLOPs) for U unique tokens."""
    return C_CRIT_SCALE * (unique_tokens / 1e6) ** C_CRIT_EXPONENT


@dataclass(frozen=True)
class Point:
    """One periodic evaluation, with the best figure so far."""

    step: int
    epochs: float
    flops: float | None
    nll: float
    best_nll: float
    best_stderr: float
    best_step: int


@dataclass(frozen=True)
class Crossing:
    step: int
    epochs: float
    flops: float | None
    diffusion: float
    ar: float
    stderr: float


def best_so_far(run: Run) -> list[Point]:
    """The run's validation curve with, at each evaluation, the lowest figure up to it."""
    records = sorted((r for r in run.metrics if r["kind"] == "val" and "nll_per_token" in r), key=lambda r: r["step"])
    per_token = run.summary.get("flops_per_token")
    unique = run.train_tokens
    points, best = [], None
    for record in records:
        if best is None or record["nll_per_token"] < best["nll_per_token"]:
            best = record
        tokens = record["step"] * run.tokens_per_step
        points.append(Point(step=record["step"], epochs=tokens / unique if unique else math.nan,
                            flops=tokens * per_token if per_token else None, nll=record["nll_per_token"],
                            best_nll=best["nll_per_token"], best_stderr=_known(best.get("stderr")),
                            best_step=best["step"]))
    return points


def _known(stderr: float | None) -> float:
    """A logged standard error; NaN where it is unknown (one sequence scored: the trainer logs
    none), so that no difference involving it counts as shown."""
    return math.nan if stderr is None else stderr


def _se(value: float) -> str:
    return "?" if math.isnan(value) else f"{value:.3f}"


def crossing(diffusion: Run, ar: Run) -> Crossing | None:
    """The first common evaluation step at which the diffusion bound so far is below AR's NLL so
    far by more than two standard errors of the difference, or None (never where a standard
    error is unknown)."""
    ar_at = {p.step: p for p in best_so_far(ar)}
    for d in best_so_far(diffusion):
        a = ar_at.get(d.step)
        if a is None:
            continue
        se = math.hypot(d.best_stderr, a.best_stderr)
        if a.best_nll - d.best_nll > 2 * se:
            return Crossing(step=d.step, epochs=d.epochs, flops=d.flops, diffusion=d.best_nll, ar=a.best_nll, stderr=se)
    return None


def repetition_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """(diffusion, AR) twins with at least two periodic evaluations each, by unique tokens then size."""
    found = twins([run for run in runs if len(best_so_far(run)) >= 2])
    return sorted(found, key=lambda p: (p[0].train_tokens or 0, p[0].parameters or 0, p[0].name))


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def repetition_lines(runs: list[Run]) -> list[str]:
    """The crossover table: per twin pair, each objective's best validation figure, the first
    compute at which the diffusion bound is below AR by more than two standard errors (or none
    within the runs), and the fitted C_crit beside it."""
    found = repetition_pairs(runs)
    if not found:
        return []
    lines = ["## Repetition: when does the diffusion bound drop below AR?", "",
             "Per twin pair: the best validation figure so far of each objective (what early stopping on "
             "validation keeps), and the first evaluation at which the diffusion NELBO (an upper bound) is below "
             "AR's exact NLL by more than two standard errors of the difference. C_crit = 2.12e15 * U^2.174 FLOPs "
             "(U in millions of unique tokens) is Prabhudesai et al.'s (2025) fitted crossover, an extrapolation "
             "at this size. Compute: tdlm's training FLOPs (6 x weights + attention + head, per token) times "
             "tokens seen.", "",
             "| pair | unique tokens U | non-emb params | evaluated up to (epochs, FLOPs) | AR best validation NLL (epochs) "
             "| diffusion best validation NELBO (epochs) | measured crossover (epochs, FLOPs) | fitted C_crit (FLOPs) |",
             "|---|---|---|---|---|---|---|---|"]
    for diffusion, ar in found:
        d_last, a_last = best_so_far(diffusion)[-1], best_so_far(ar)[-1]
        a_best = min(best_so_far(ar), key=lambda p: p.nll)
        d_best = min(best_so_far(diffusion), key=lambda p: p.nll)
        cross = crossing(diffusion, ar)
        last = min(d_last, a_last, key=lambda p: p.step)
        measured = (f"{format_number(cross.epochs)} epochs, {_flops(cross.flops)} (AR {cross.ar:.3f} vs <= "
                    f"{cross.diffusion:.3f} ± {cross.stderr:.3f})" if cross else "none within the runs")
        unique = diffusion.train_tokens
        lines.append(
            f"| {diffusion.group_label or diffusion.name} | {format_count(unique)} | {format_count(diffusion.parameters)} "
            f"| {format_number(last.epochs)}, {_flops(last.flops)} | {a_best.nll:.3f} ± {_se(a_best.best_stderr)} "
            f"({format_number(a_best.epochs)}) | {d_best.nll:.3f} ± {_se(d_best.best_stderr)} ({format_number(d_best.epochs)}) "
            f"| {measured} | {_flops(c_crit(unique)) if unique else '-'} |")
    cautions = [caution for diffusion, ar in found for caution in first_evaluation_cautions(diffusion, ar)]
    return lines + [""] + cautions + ([""] if cautions else [])


def first_evaluation_cautions(diffusion: Run, ar: Run) -> list[str]:
    """A warning for each run of a pair whose best validation figure is its first evaluation: its
    optimum may lie before it, so its best figure is only an upper limit of what early stopping
    would keep, and a crossover read against an AR run so cut off may be an artefact of the grid
    (a large model on few unique tokens overfits within a few epochs)."""
    cautions = []
    for run, word in ((ar, "AR"), (diffusion, "diffusion")):
        points = best_so_far(run)
        if points[-1].best_step == points[0].step:
            cautions.append(
                f"- Caution: {word} run {run.name} is best at its first validation (step {points[0].step}, "
                f"{format_number(points[0].epochs)} epochs): its optimum may come earlier, so its best figure here is "
                f"only an upper limit{' and a crossover against it may be an artefact of the grid' if word == 'AR' else ''}; "
                "validate more often over the first epochs (training.eval_every) to find it.")
    return cautions


def plot_repetition(runs: list[Run], path: Path) -> Path | None:
    """Two rows, a column per twin pair: the validation figures against epochs (top) and the
    best figure so far against training FLOPs with the measured crossover and the fitted
    C_crit marked (bottom). Diffusion dashed blue (a bound), AR solid red (exact)."""
    found = repetition_pairs(runs)
    if not found:
        return None
    plt = pyplot()
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, len(found), figsize=(max(6.0, 4.6 * len(found)), 7.6), squeeze=False)
    for column, (diffusion, ar) in enumerate(found):
        top, bottom = axes[0][column], axes[1][column]
        for run, colour, style, word in ((diffusion, "tab:blue", "--", "diffusion NELBO (bound)"),
                                         (ar, "tab:red", "-", "AR NLL (exact)")):
            points = best_so_far(run)
            top.plot([p.epochs for p in points], [p.nll for p in points], style, color=colour, marker=".", label=word)
            if all(p.flops for p in points):
                bottom.plot([p.flops for p in points], [p.best_nll for p in points], style, color=colour,
                            label=f"{word}, best so far")
        cross = crossing(diffusion, ar)
        if cross and cross.flops:
            bottom.axvline(cross.flops, color="black", linewidth=1)
            bottom.plot([cross.flops], [cross.diffusion], marker="*", markersize=12, color="black",
                        label=f"measured crossover ({format_number(cross.epochs)} epochs)")
        unique = diffusion.train_tokens
        if unique:
            bottom.axvline(c_crit(unique), color="grey", linestyle=":", linewidth=1.2, label="fitted C_crit")
        label = diffusion.group_label or diffusion.name
        top.set_title(f"{label}: U = {format_count(unique)} unique tokens", fontsize=10)
        top.set_xscale("log")
        top.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        top.xaxis.set_major_formatter(ScalarFormatter())  # epochs as numbers, not powers of ten
        top.xaxis.set_minor_formatter(NullFormatter())
        top.set_xlabel("epochs")
        top.set_ylabel("validation nats / token")
        bottom.set_xscale("log")
        bottom.xaxis.set_minor_formatter(NullFormatter())  # a span under a decade labels its minor ticks on top of each other
        bottom.set_xlabel("training FLOPs")
        bottom.set_ylabel("best validation nats / token so far")
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle("Diffusion vs AR as data repeats\n(the diffusion figure is an upper bound, AR's is exact)", fontsize=10)
    return save_figure(fig, path, plt)


def plot_gap(runs: list[Run], path: Path, *, x: str, pairs_: list[tuple[Run, Run, str]]) -> Path | None:
    """AR NLL minus diffusion NELBO (final figures, ± two standard errors) against `x`
    ("parameters" or "epochs"), a line per remaining config difference; above zero the diffusion
    bound is lower (diffusion better), below zero AR is lower than the bound (undecided about the
    diffusion model itself)."""
    value = {"epochs": lambda r: r.epochs, "parameters": lambda r: r.parameters}[x]
    without = ("model",) if x == "parameters" else ("data.max_train_tokens", "training.epochs", "training.max_steps")
    series: dict[str, list[tuple[float, float, float]]] = {}
    for diffusion, ar, split in pairs_:
        if value(diffusion) is None:
            continue
        d, a = diffusion.final(split), ar.final(split)
        gap = a["nll_per_token"] - d["nll_per_token"]
        se = math.hypot(d.get("stderr") or 0.0, a.get("stderr") or 0.0)
        series.setdefault(diffusion.key(without=without), []).append((value(diffusion), gap, se))
    series = {k: sorted(v) for k, v in series.items() if len({p[0] for p in v}) >= 2}
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, points in enumerate(series.values()):
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[2 * p[2] for p in points], capsize=3,
                    marker="o", label=f"series {i + 1}" if len(series) > 1 else None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters" if x == "parameters" else "epochs")
    ax.set_ylabel("AR NLL - diffusion NELBO (nats / token)")
    ax.set_title("Gap on the final split, ± 2 standard errors: above 0 the diffusion bound is lower", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, path, plt)
