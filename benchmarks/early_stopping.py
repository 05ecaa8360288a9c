"""Early stopping on a finer validation grid: each model's best validation figure over the
validation curves of several run directories that train the same model with the same schedule
and seed (e.g. the full run, validated every 128 steps, and a copy stopped early with
`--stop-at`, validated every 16 steps), and the test figure of that best checkpoint.

    python benchmarks/early_stopping.py \
        d256:ar=runs/sizes_quick/ar-d256,runs/sizes_quick_early/ar-d256-early \
        d256:diffusion=runs/sizes_quick/diffusion-d256,runs/sizes_quick_early/diffusion-d256-early \
        --test runs/sizes_quick_early/ar-d256-early=ar_d256_test.json --out results.json

Each argument is LABEL:OBJECTIVE=RUN[,RUN...]. The runs of one model must agree wherever their
grids meet (checked: the same model and data give the same validation figure at the same step).
The test figure is read from the run whose `best` checkpoint is the overall best: its summary.json
when its own final test scored that checkpoint, else the `tdlm eval RUN --split test --json`
output (which scores `best`) given as --test RUN=FILE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdlm.training.monitor import read_metrics


def validation(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (NLL or NELBO per token, its standard error) of the run's periodic validations."""
    return {r["step"]: (r["nll_per_token"], r.get("stderr") or 0.0) for r in read_metrics(run_dir, "val")}


def best_of(runs: list[Path]) -> tuple[int, float, float, Path]:
    """(step, figure, stderr, run) of the lowest validation figure over the runs' merged curves."""
    merged: dict[int, tuple[float, float, Path]] = {}
    for run in runs:
        for step, (value, stderr) in validation(run).items():
            if step in merged and abs(merged[step][0] - value) > 1e-6:
                raise SystemExit(f"{run} and {merged[step][2]} disagree at step {step}: not the same training")
            merged.setdefault(step, (value, stderr, run))
    step = min(merged, key=lambda s: merged[s][0])
    return step, *merged[step]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="LABEL:OBJECTIVE=RUN[,RUN...]")
    parser.add_argument("--test", action="append", default=[], metavar="RUN=FILE",
                        help="a run's `tdlm eval --split test --json` output (repeatable)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    parser.add_argument("--plot", type=Path, help="draw the test gap (AR - diffusion) against non-embedding "
                                                  "parameters here (a PNG), one point per label with both objectives")
    args = parser.parse_args()
    tests = {Path(run): Path(file) for run, _, file in (item.partition("=") for item in args.test)}
    rows = []
    for spec in args.models:
        label, _, runs = spec.partition("=")
        runs = [Path(p) for p in runs.split(",")]
        step, value, stderr, run = best_of(runs)
        summary = json.loads((run / "summary.json").read_text())
        epochs = step * summary["tokens_seen"] / max(summary["step"], 1) / summary["train_tokens"]
        if summary.get("status") == "finished" and summary.get("checkpoint", "").endswith(f"{step:07d}"):
            test = summary["test"]
        else:
            if run not in tests:
                raise SystemExit(f"the best checkpoint of {label} is {run}'s step {step}, which its summary does not "
                                 f"score: give --test {run}=FILE (tdlm eval {run} --split test --json > FILE)")
            path = tests[run]
            text = path.read_text()
            test = json.loads(text[text.index("{"):])
            if test.get("checkpoint") != f"step-{step:07d}":
                raise SystemExit(f"{path} scored {test.get('checkpoint')}, not the best checkpoint of {run} "
                                 f"(step-{step:07d})")
        rows.append({"model": label, "run": str(run), "non_embedding_parameters": summary["non_embedding_parameters"], "best_step": step, "best_epochs": round(epochs, 1),
                     "valid": value, "valid_stderr": stderr, "test": test["nll_per_token"],
                     "test_stderr": test["stderr"], "is_bound": test.get("is_bound")})
        print(f"{label:24s} best valid {value:.3f} ± {stderr:.3f} at step {step} ({epochs:.0f} epochs) -> "
              f"test {test['nll_per_token']:.3f} ± {test['stderr']:.3f}  [{run}]")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot_gap(rows, args.plot)


def plot_gap(rows: list[dict], path: Path) -> None:
    """AR test NLL minus diffusion test NELBO (± 2 standard errors) against size: above 0 the
    diffusion bound is lower."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, dict[str, dict]] = {}
    for row in rows:
        label, _, objective = row["model"].partition(":")
        by_label.setdefault(label, {})[objective] = row
    points = sorted((r["ar"]["non_embedding_parameters"], r["ar"]["test"] - r["diffusion"]["test"],
                     2 * math.hypot(r["ar"]["test_stderr"], r["diffusion"]["test_stderr"]), label)
                    for label, r in by_label.items() if {"ar", "diffusion"} <= r.keys())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3)
    for x, y, _, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("AR NLL - diffusion NELBO (nats/token)")
    ax.set_title("Test gap at each model's early-stopped best, ± 2 SE (above 0: diffusion bound lower)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
