"""`tdlm lm-eval RUN --tasks ...`: lm-evaluation-harness tasks on a trained run (tdlm.studies.harness).

A click command of its own, added to the `tdlm` group in tdlm/cli.py; lm-eval (an optional
extra) is imported only when the command runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tdlm.cli_options import check_device, check_seed, sampler_options
from tdlm.errors import TdlmError, UsageError
from tdlm.files import write_atomically
from tdlm.jsontext import dumps

INSTALL = 'pip install -e ".[lm-eval]"'


def import_harness():
    """tdlm.studies.harness, or a one-line TdlmError saying how to install lm-eval."""
    try:
        from tdlm.studies import harness
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "lm_eval":
            raise
        raise TdlmError(f"lm-evaluation-harness is not installed: {INSTALL}") from None
    return harness


@click.command("lm-eval")
@click.argument("run_dir", type=click.Path())  # checked by load_run: one message
@click.option("--tasks", required=True, metavar="NAMES",
              help="lm-eval task or group names, comma-separated (glob patterns allowed).")
@click.option("--include-path", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="A folder of task YAML files (local tasks, local data files).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N documents per task (a quick check).")
@click.option("--checkpoint", "which", default="best", show_default=True, help="best, last or a step number.")
@click.option("--t-samples", type=click.IntRange(min=1), default=None,
              help="Diffusion: stratified t per request for the bound (default: the recipe's eval.t_samples).")
@click.option("--seed", type=int, default=None,
              help="Seed of the mask draws and of the samples (default: the recipe's eval.seed).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Requests per forward pass (default: the recipe's eval.batch_size).")
@click.option("--sampler", default=None, help="Sampler of generate_until tasks (default: the recipe's).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Sampler option, values in TOML, e.g. --option steps=64 (repeatable).")
@click.option("--output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write lm-eval's whole result (results, configs, versions) as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def lm_eval_command(run_dir, tasks, include_path, limit, which, t_samples, seed, device, batch_size, sampler, options,
                    output, as_json):
    """Run lm-evaluation-harness TASKS on a trained run: exact log-likelihoods for AR, for diffusion
    bounds (minus the NELBO of the continuation given the context: accuracies compare bounds)."""
    harness = import_harness()
    if seed is not None:
        check_seed(seed)
    if output is not None and not Path(output).resolve().parent.is_dir():
        raise UsageError(f"--output {output}: the folder {Path(output).resolve().parent} does not exist")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury the table
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    results = harness.run_tasks(run_dir, names, include_path=include_path, limit=limit, which=which,
                                t_samples=t_samples, seed=seed, device=check_device(device), batch_size=batch_size,
                                sampler=sampler, sampler_options=sampler_options(options) if options else None)
    from lm_eval.utils import handle_non_serializable, make_table

    if output is not None:
        write_atomically(output, dumps(results, default=handle_non_serializable))
    summary = {"tdlm": results["tdlm"], "results": results["results"], "n-samples": results.get("n-samples")}
    if as_json:
        click.echo(dumps(summary, default=handle_non_serializable))
        return
    scored = results["tdlm"]
    kind = (f"bounds: minus the NELBO, {scored['t_samples']} t-samples, seed {scored['seed']}" if scored["is_bound"]
            else "exact log-likelihoods")
    click.echo(f"{scored['run']} ({scored['checkpoint']}, {scored['objective']}: {kind})")
    click.echo(make_table(results))
    if output is not None:
        click.echo(f"wrote {output}", err=True)
