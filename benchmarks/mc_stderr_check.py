"""Is the reported Monte Carlo standard error honest? The spread of `tdlm eval --seed s` over
several seeds against the mc_stderr each evaluation reports, for the NELBO drawn under the
recipe's schedule and under cosine.

    python benchmarks/mc_stderr_check.py runs/quick_wikitext2 --seeds 8 --split test

With the linear schedule the estimator's variance is infinite (w(t) = 1/t meets rare masked
tokens near t = 0), so one evaluation's mc_stderr can understate the spread across seeds; with
cosine's t (the same NELBO for a denoiser that does not see t) it is finite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--split", default="test")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--schedules", default="recipe,cosine", help="comma-separated: recipe, cosine")
    parser.add_argument("--log", default=None, help="append each evaluation's JSON to this file (one per line)")
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"{args.run}, {args.split} split, seeds {seeds.start}..{seeds.stop - 1}")
    print(f"{'t drawn under':<34}{'mean NELBO':>11}{'sd over seeds':>15}{'mean mc_stderr':>16}{'ratio':>8}")
    for schedule in args.schedules.split(","):
        results = []
        for seed in seeds:
            out = subprocess.run([sys.executable, "-m", "tdlm", "eval", args.run, "--split", args.split,
                                  "--seed", str(seed), "--t-schedule", schedule, "--json"],
                                 capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out))
            if args.log:
                with open(args.log, "a") as log:
                    log.write(json.dumps({**results[-1], "seed": seed, "t_schedule": schedule}) + "\n")
        values = [r["nll_per_token"] for r in results]
        spread, reported = statistics.stdev(values), statistics.mean(r["mc_stderr"] for r in results)
        print(f"{results[0]['estimator'][:33]:<34}{statistics.mean(values):>11.4f}{spread:>15.4f}"
              f"{reported:>16.4f}{spread / reported:>8.2f}")


if __name__ == "__main__":
    main()
