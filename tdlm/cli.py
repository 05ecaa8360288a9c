"""The `tdlm` command. Heavy modules (torch, accelerate) are imported inside each command."""

from __future__ import annotations

import json
import sys

import click

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    click.echo(f"tdlm: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _load_recipe(recipe: str, overrides: tuple[str, ...]):
    """Read, validate and resolve a recipe: every problem is reported before any work starts."""
    from tdlm.config import RecipeError, read_recipe, resolve_components
    from tdlm.plugins import PluginError, build_registry

    try:
        cfg = read_recipe(recipe, overrides)
        return cfg, resolve_components(cfg, build_registry())
    except (RecipeError, PluginError) as exc:
        _fail(str(exc))


@click.group()
@click.version_option(package_name="tdlm")
def cli():
    """tdlm: train, evaluate and sample tiny masked-diffusion and autoregressive language models."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set training.max_steps=20 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option("--stop-at", type=int, default=None, metavar="STEP",
              help="Checkpoint and stop at this step (the schedule still follows the recipe); go on with --resume.")
@click.option("--check", is_flag=True, help="Only validate the recipe and print the resolved config.")
def run(recipe, overrides, resume, stop_at, check):
    """Train the model a RECIPE describes, then score it and print a sample."""
    cfg, components = _load_recipe(recipe, overrides)
    if check:
        from tdlm.config import resolved_dict, to_toml

        click.echo(to_toml(resolved_dict(cfg, components)))
        return
    from tdlm.config import RecipeError
    from tdlm.data import DataNotFoundError
    from tdlm.evaluate import format_result
    from tdlm.train import TrainingDiverged, train

    try:
        summary = train(cfg, components, resume=resume, stop_at=stop_at)
    except (RecipeError, DataNotFoundError) as exc:
        _fail(str(exc))
    except TrainingDiverged as exc:
        click.echo(f"tdlm: {exc}", err=True)
        sys.exit(1)
    if summary["status"] != "finished":
        click.echo(f"stopped at step {summary['step']} of {summary['total_steps']}; continue with: "
                   f"tdlm run {recipe} --resume" + "".join(f" --set {o}" for o in overrides))
        return
    click.echo(f"\n{cfg.run.name}: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
               f"{summary['wall_time_s']:.0f} s on {summary['device']} (scored: {summary['checkpoint']})")
    for split in cfg.eval.final_splits:
        click.echo(format_result(summary[split]))
    for i, text in enumerate(summary.get("samples", [])[:1]):
        click.echo(f"\nsample {i}:\n{text}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--t-samples", type=click.IntRange(min=1), default=None,
              help="Stratified t per sequence for the NELBO (default: the recipe's eval.t_samples).")
@click.option("--checkpoint", "which", default="best", show_default=True, help="best, last or a step number.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=None, help="Seed of the mask draws (default: the recipe's eval.seed).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(run_dir, split, t_samples, which, batch_size, seed, device, as_json):
    """Score a trained run on held-out data: valid NELBO (diffusion) or exact NLL (AR)."""
    from tdlm.data import pack
    from tdlm.evaluate import evaluate, format_result

    device = device or _default_device()
    loaded = _load_run(run_dir, which=which, device=device)
    cfg = loaded.cfg
    seqs, tail = pack(loaded.corpus.splits[split], cfg.data.seq_len)
    result = evaluate(loaded.built.model, seqs, tail, num_bytes=loaded.corpus.num_bytes,
                      t_samples=t_samples or cfg.eval.t_samples, batch_size=batch_size or cfg.eval.batch_size,
                      seed=cfg.eval.seed if seed is None else seed, device=device, split=split,
                      progress=not as_json)
    result["run"] = str(run_dir)
    result["checkpoint"] = loaded.checkpoint.name
    click.echo(json.dumps(result, indent=2) if as_json else format_result(result))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--num", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--length", type=click.IntRange(min=1), default=None, help="Tokens per sample (default: seq_len).")
@click.option("--prompt", default=None, help="Text the samples start with (kept fixed).")
@click.option("--sampler", default=None, help="Sampler name (default: the recipe's).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Sampler option, e.g. --option steps=64 (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint", "which", default="best", show_default=True)
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True)
def sample(run_dir, num, length, prompt, sampler, options, seed, which, device, as_json):
    """Generate text from a trained run."""
    import time

    import torch

    from tdlm.config import parse_override

    device = device or _default_device()
    sampler_choice = None
    if sampler or options:
        parsed = dict((".".join(k), v) for k, v in map(parse_override, options))
        sampler_choice = (sampler, parsed)
    loaded = _load_run(run_dir, which=which, device=device, sampler=sampler_choice)
    vocab, cfg = loaded.corpus.vocab, loaded.cfg
    length = length or cfg.data.seq_len
    prompt_ids = vocab.encode(prompt) if prompt else []
    if len(prompt_ids) >= length:
        _fail(f"the prompt is {len(prompt_ids)} tokens, not shorter than --length {length}")
    if length > cfg.data.seq_len:
        _fail(f"--length {length} exceeds the model's sequence length {cfg.data.seq_len}")
    canvas = torch.full((num, length), vocab.mask_id, dtype=torch.long)
    canvas[:, : len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    out = loaded.built.sampler.sample(loaded.built.model.net, canvas.to(device), generator)
    seconds = time.perf_counter() - start
    texts = [vocab.decode(row.tolist()) for row in out.tokens]
    if as_json:
        click.echo(json.dumps({"samples": texts, "nfe": out.nfe, "seconds": seconds,
                               "sampler": loaded.components["sampler"][0].name}, indent=2))
        return
    for i, text in enumerate(texts):
        click.echo(f"--- sample {i}\n{text}")
    click.echo(f"--- {num} x {length} tokens, {out.nfe} model calls, {seconds:.2f} s")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def plugins(as_json):
    """List every installed component by kind, with the plugin and package that provide it."""
    from tdlm.plugins import KINDS, PluginError, build_registry

    try:
        registry = build_registry()
    except PluginError as exc:
        _fail(str(exc))
    rows = [{"kind": c.kind, "name": c.name, "plugin": c.plugin, "package": c.package, "version": c.version,
             "options": sorted(c.config_cls.model_fields)} for c in registry.all()]
    if as_json:
        click.echo(json.dumps({"components": rows, "failed": registry.failed}, indent=2))
        return
    for kind in KINDS:
        click.echo(f"{kind}s:")
        for row in (r for r in rows if r["kind"] == kind):
            options = f"  options: {', '.join(row['options'])}" if row["options"] else ""
            click.echo(f"  {row['name']:<18} {row['package']} {row['version']} ({row['plugin']}){options}")
    for plugin, error in registry.failed.items():
        click.echo(f"failed to load: {plugin}: {error}")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_run(run_dir, **kwargs):
    from tdlm.config import RecipeError
    from tdlm.data import DataNotFoundError
    from tdlm.plugins import PluginError
    from tdlm.runs import load_run

    try:
        return load_run(run_dir, **kwargs)
    except (RecipeError, PluginError, DataNotFoundError, FileNotFoundError) as exc:
        _fail(str(exc))


def main():
    cli(prog_name="tdlm")


if __name__ == "__main__":
    main()
