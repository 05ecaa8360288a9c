"""The `tdlm` command. Heavy modules (torch, accelerate) are imported inside each command."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

# Two torch threads that spin while they wait for each other burn the cores another process
# (or the other thread) needs; passive waiting was 2.4-2.9x faster on a shared 2-core machine.
# OpenMP reads this once, when torch is first imported (inside the commands below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tdlm.cli_options import check_device, check_seed, sampler_options
from tdlm.errors import RunInterrupted, TdlmError, TrainingDiverged, UsageError
from tdlm.export.cli import export_command
from tdlm.jsontext import dumps
from tdlm.studies.harness_cli import lm_eval_command

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1


def _fail(message: str) -> NoReturn:
    """Refuse a command-line value: the one handler below prints the message."""
    raise UsageError(message)


class _Commands(click.Group):
    """The one place where a command's failure becomes what the user sees. Every user error
    (TdlmError) ends as one line on stderr and exit code 2; so do file-system errors on a path (a
    read-only folder, a path through a file, a full disk): the user fixes them, not the code. A
    run stopped at once by a signal ends as one line and 128 + the signal's number (as a shell
    reports it); a run that diverged as one line and exit code 1 (not the user's mistake)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RunInterrupted as exc:
            click.echo(f"tdlm: {exc}", err=True)
            sys.exit(128 + exc.signum)
        except TrainingDiverged as exc:
            click.echo(f"tdlm: {exc}", err=True)
            sys.exit(EXIT_DIVERGED)
        except TdlmError as exc:
            _print_error(str(exc))
        except OSError as exc:
            if exc.filename is None:
                raise  # not about a path the user gave: a bug to see whole
            _print_error(_file_problem(exc))


def _print_error(message: str) -> NoReturn:
    click.echo(f"tdlm: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _file_problem(exc: OSError) -> str:
    """An OSError on a path as one line: the path, what the system said, what to check."""
    path = exc.filename + (f" -> {exc.filename2}" if exc.filename2 else "")
    return (f"{path}: {exc.strerror or type(exc).__name__}; check that the path exists, is the kind of file meant "
            "(a folder or a file), and can be written, then try again")


def _load_recipe(recipe: str, overrides: tuple[str, ...], unset: tuple[str, ...] = ()):
    """Read, validate and resolve a recipe: every problem is reported before any work starts."""
    from tdlm.config import read_recipe, resolve_components
    from tdlm.registry import build_registry

    cfg = read_recipe(recipe, overrides, unset)
    return cfg, resolve_components(cfg, build_registry())


@click.group(cls=_Commands)
@click.version_option(package_name="tdlm")
def cli():
    """tdlm: train, evaluate and sample tiny masked-diffusion and autoregressive language models."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set training.max_steps=20 (repeatable).")
@click.option("--unset", "unset", multiple=True, metavar="KEY",
              help="Remove a recipe key, e.g. the old component's options after --set corruption.name=... (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option("--stop-at", type=int, default=None, metavar="STEP",
              help="Checkpoint and stop at this step (the schedule still follows the recipe); go on with --resume.")
@click.option("--check", is_flag=True, help="Only validate the recipe and print the resolved config.")
def run(recipe, overrides, unset, resume, stop_at, check):
    """Train the model a RECIPE describes, then score it and print a sample."""
    started = time.perf_counter()  # summary.json's timing.startup_s counts from here (torch is imported below)
    if stop_at is not None and stop_at < 1:
        _fail(f"--stop-at {stop_at}: a step to stop after must be at least 1")
    cfg, components = _load_recipe(recipe, overrides, unset)
    if check:
        from tdlm.config import resolved_dict, to_toml
        from tdlm.data.locate import file_in_the_way, not_a_folder
        from tdlm.training.run_files import with_manifest

        blocker = file_in_the_way(Path(cfg.run.out_dir) / cfg.run.name)
        if blocker is not None:
            _fail(f"run.out_dir {cfg.run.out_dir}: {blocker} {not_a_folder(blocker)}; set run.out_dir to a folder")
        cfg = with_manifest(cfg, warn=lambda line: click.echo(line, err=True))  # shards: their tokenizer
        from tdlm.init_from import check_before_start, with_resolved_source

        cfg = with_resolved_source(cfg)
        check_before_start(cfg)  # training.init_from: the source opens and fits, as far as is cheap to tell
        click.echo(to_toml(resolved_dict(cfg, components)))
        return
    from tdlm.evaluate import format_result
    from tdlm.rundir import load_draft
    from tdlm.training.trainer import train

    summary = train(cfg, components, resume=resume, stop_at=stop_at, started=started, load_draft=load_draft)
    if os.environ.get("RANK", "0") != "0":  # one report per run, from the main process
        return
    if summary["status"] != "finished":
        command = ["tdlm", "run", recipe, "--resume", *(a for o in overrides for a in ("--set", o)),
                   *(a for key in unset for a in ("--unset", key))]
        click.echo(f"stopped at step {summary['step']} of {summary['total_steps']}; continue with: "
                   + " ".join(shlex.quote(str(word)) for word in command))  # pasted into a shell as it is
        return
    click.echo(f"\n{cfg.run.name}: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
               f"{summary['wall_time_s']:.0f} s on {summary['device']} (scored: {summary['checkpoint']})")
    for split in cfg.eval.final_splits:
        click.echo(format_result(summary[split]))
    from tdlm.sampling.select import options_label

    sampler = components["sampler"]
    settings = options_label(sampler.config.model_dump(mode="json"))
    for i, text in enumerate(summary.get("samples", [])[:1]):
        click.echo(f"\nsample {i} ({sampler.component.name}: {settings}):\n{text}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path())  # checked by load_run: one message
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--text", "texts", multiple=True, metavar="FILE",
              help="Score this UTF-8 text file instead of a split (repeatable): zero-shot evaluation.")
@click.option("--data", "source", default=None, metavar="SOURCE",
              help="Score held-out text of another corpus: a folder with test.txt, wikitext2, or "
                   "hf:NAME[:CONFIG][:SPLIT] (online).")
@click.option("--t-samples", type=click.IntRange(min=1), default=None,
              help="Stratified t per sequence for the NELBO (default: the recipe's eval.t_samples).")
@click.option("--checkpoint", "which", default="best", show_default=True, help="best, last or a step number.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=None, help="Seed of the mask draws (default: the recipe's eval.seed).")
@click.option("--t-schedule", type=click.Choice(["cosine", "recipe"]), default=None,
              help="Draw the NELBO's t under cosine (finite variance) or the recipe's schedule "
                   "(default: the run's objective.eval_schedule).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Score under other components or settings (schedule.*, corruption.*, objective.*, sampler.*, "
                   "eval.*), e.g. --set corruption.name=uniform (repeatable); the network's shape cannot change.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(run_dir, split, texts, source, t_samples, which, batch_size, seed, t_schedule, device, overrides, as_json):
    """Score a trained run on held-out data: valid NELBO (diffusion) or exact NLL (AR).

    With --text or --data, any text is tokenised with the run's own tokenizer, packed at the
    run's sequence length (the last partial sequence scored too) and scored with the same
    estimator and seed; the result adds `source`.
    """
    from tdlm.data import pack
    from tdlm.data.corpus import text_file_tokens
    from tdlm.data.shards_prepare import held_out_file
    from tdlm.evaluate import evaluate, format_result
    from tdlm.rundir import load_run

    if source is not None and texts:
        _fail("give --text FILE or --data SOURCE, not both")
    device = check_device(device)
    if seed is not None:
        check_seed(seed)
    loaded = load_run(run_dir, which=which, device=device, overrides=list(overrides))
    for key, (saved, used) in loaded.overrides.items():
        click.echo(f"tdlm: {key}: {saved} -> {used}", err=True)
    if loaded.left_out:
        click.echo(f"tdlm: not used under these components: {', '.join(loaded.left_out)}", err=True)
    cfg, corpus = loaded.cfg, loaded.corpus
    objective = loaded.built.model.objective
    if t_schedule is not None:
        objective.set_eval_schedule(t_schedule)  # an objective that draws no t (AR) ignores it
    if source is not None:
        texts = (str(held_out_file(source)),)
    streams = [(f"text:{Path(f).name}", f, text_file_tokens(f, corpus.vocab, documents=cfg.data.documents))
               for f in texts] or \
              [(split, None, corpus.splits[split])]
    results = []
    for name, origin, tokens in streams:
        seqs, tail = pack(tokens, cfg.data.seq_len)
        result = evaluate(loaded.built.model, seqs, tail, num_bytes=corpus.num_bytes,
                          t_samples=t_samples or cfg.eval.t_samples, batch_size=batch_size or cfg.eval.batch_size,
                          seed=cfg.eval.seed if seed is None else seed, device=device, split=name,
                          progress=not as_json)
        result["run"] = str(run_dir)
        result["checkpoint"] = loaded.checkpoint.name
        if loaded.overrides:
            result["overrides"] = {key: used for key, (_, used) in loaded.overrides.items()}
        if origin is not None:
            result["source"] = source or str(origin)
        results.append(result)
    if as_json:
        click.echo(dumps(results[0] if len(results) == 1 else results))
    else:
        click.echo("\n".join(format_result(result) for result in results))


def _canvas_ids(vocab, *, prompt, template, length, seq_len) -> list[int]:
    """One row of the canvas: the prompt then masks up to `length`, or the infill template."""
    from tdlm.sampling.template import parse_template, template_ids

    if template is None:
        length = length or seq_len
        if length > seq_len:
            _fail(f"--length {length} is more than the model's sequence length {seq_len}")
        ids = vocab.encode(prompt) if prompt else []
        if len(ids) >= length:
            _fail(f"the prompt is {len(ids)} tokens, not shorter than --length {length}")
        ids += [vocab.mask_id] * (length - len(ids))
    else:
        parts = parse_template(template)
        masks = sum(part for part in parts if isinstance(part, int))
        if masks > seq_len:  # before the canvas is allocated
            _fail(f"the template's spans ask for {masks} tokens, more than the model's sequence length {seq_len}")
        ids = template_ids(parts, vocab.encode, vocab.mask_id)
    if len(ids) > seq_len:
        _fail(f"the canvas is {len(ids)} tokens, more than the model's sequence length {seq_len}")
    return ids


@cli.command()
@click.argument("run_dir", type=click.Path())  # checked by load_run: one message
@click.option("--num", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--length", type=click.IntRange(min=1), default=None, help="Tokens per sample (default: seq_len).")
@click.option("--prompt", default=None, help="Text the samples start with (kept fixed).")
@click.option("--template", default=None,
              help='Infill template: text with <mask:N> for N tokens to generate and <mask> for one, e.g. '
                   '"The<mask:3> of France is Paris ."; only the spans are filled, the text is kept.')
@click.option("--stop-at-eos", is_flag=True,
              help="Cut each generated span at its first <|endoftext|> (with a prompt: end the sample there).")
@click.option("--sampler", default=None, help="Sampler name (default: the recipe's).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Sampler option, values in TOML, e.g. --option steps=64 or --option inner_options={steps=8} "
                   "(repeatable).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint", "which", default="best", show_default=True)
@click.option("--device", default=None)
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="Draw the first sample being denoised, step by step, into a .png (or an animated .gif).")
@click.option("--json", "as_json", is_flag=True, help="Print samples, nfe, seconds and tokens_per_s as JSON.")
def sample(run_dir, num, length, prompt, template, stop_at_eos, sampler, options, seed, which, device, trace, as_json):
    """Generate text from a trained run: from scratch, after a --prompt, or into a --template.

    Reports the model calls (NFE) and the generated tokens per second, the tokens the sampler
    filled (masked positions) over its wall time.
    """
    import torch

    from tdlm.rundir import load_run
    from tdlm.sampling.generate import generate
    from tdlm.sampling.template import parse_template

    if template is not None:
        if prompt is not None or length is not None:
            _fail("--template sets the whole canvas: give the prompt and the length in the template, "
                  "not as --prompt / --length")
        if not any(isinstance(part, int) for part in parse_template(template)):
            _fail("the template has no <mask> or <mask:N> span to fill")
    if trace is not None:
        if Path(trace).suffix.lower() not in (".png", ".gif"):
            _fail(f"--trace {trace}: the picture is a .png or an animated .gif")
        if not Path(trace).resolve().parent.is_dir():
            _fail(f"--trace {trace}: the folder {Path(trace).resolve().parent} does not exist")
    device = check_device(device)
    check_seed(seed)
    sampler_choice = (sampler, sampler_options(options)) if sampler or options else None
    loaded = load_run(run_dir, which=which, device=device, sampler=sampler_choice)  # the sampler fits the run
    vocab, cfg, built_sampler = loaded.corpus.vocab, loaded.cfg, loaded.built.sampler
    if stop_at_eos:
        from tdlm.vocab_info import vocab_info

        if vocab_info(loaded.corpus).token_counts[vocab.bos_id] == 0:
            _fail(f"--stop-at-eos: the model in {run_dir} never saw an end-of-text token in training (data.documents = "
                  f"{cfg.data.documents!r} and the text holds no <|endoftext|>), so it cannot know where a text ends; "
                  "train with data.documents = 'wikitext-titles' (WikiText) or 'blank-lines' (a text folder)")
    if stop_at_eos:
        built_sampler.set_stop_at_eos()  # a sampler that supports it saves calls (ar)
    ids = _canvas_ids(vocab, prompt=prompt, template=template, length=length, seq_len=cfg.data.seq_len)
    canvas = torch.tensor(ids, dtype=torch.long).expand(num, -1).contiguous()
    if trace is not None:
        built_sampler.trace = []
    generator = torch.Generator(device=device).manual_seed(seed)
    made = generate(loaded.built.model.net, built_sampler, canvas, generator, vocab, stop_at_eos=stop_at_eos)
    (out,) = made.outputs
    name = loaded.components["sampler"].component.name
    if trace is not None:
        from tdlm.sampling.trace import draw_trace

        frames = [canvas[0]] + [frame[0] for frame in built_sampler.trace]
        if not torch.equal(frames[-1], made.tokens[0]):
            frames.append(made.tokens[0])
        draw_trace([f.numpy() for f in frames], vocab.mask_id, vocab.decode, trace, title=f"{name}:")
        click.echo(f"wrote {trace} ({len(frames) - 1} steps of sample 0)", err=True)
    if as_json:
        click.echo(dumps({"samples": made.texts, "nfe": out.nfe, "seconds": made.seconds,
                               "tokens_per_s": made.tokens_per_s, "generated_tokens": made.generated_tokens,
                               "sampler": name, "stats": out.stats}))
        return
    for i, text in enumerate(made.texts):
        click.echo(f"--- sample {i}\n{text}")
    click.echo(f"--- {num} x {len(ids)} tokens ({made.generated_tokens} generated), {out.nfe} model calls, "
               f"{made.seconds:.2f} s, {made.tokens_per_s:,.0f} tokens/s")
    if out.stats:
        click.echo("--- " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in out.stats.items() if not isinstance(v, (list, dict))))


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Only list the runs: name, status (finished/stopped/aborted/new), size, overrides.")
@click.option("--only", "patterns", multiple=True, metavar="GLOB",
              help="Only the runs whose name matches, e.g. --only 'ar-*' (repeatable).")
@click.option("--emit", type=click.Choice(["accelerate", "slurm"]), default=None,
              help="Print launch commands instead of running: one `accelerate launch` line per run, or a SLURM "
                   "array script (written with its commands file under the sweep's folder).")
@click.option("--launch-config", default="launch/multi_gpu.yaml", show_default=True,
              help="accelerate config file of the emitted commands.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, help="GPUs per run (--emit slurm).")
@click.option("--time", "time_limit", default="12:00:00", show_default=True, help="Time limit per run (--emit slurm).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs at once, each its own process (CPU: the cores are split between them; one GPU: shared). "
                   "Their output goes to <out_dir>/<sweep>/.logs/<run>.log.")
def sweep(sweep_file, dry_run, patterns, emit, launch_config, gpus, time_limit, jobs):
    """Train every run of a SWEEP_FILE (base recipes x a grid of overrides), one after the other
    (or --jobs N at a time).

    Every run's recipe is validated first. Finished runs are skipped and stopped ones resumed,
    so the same command continues a sweep; a failed run does not stop the others and is
    reported at the end (exit code 1). Ctrl-C makes every running run save a checkpoint and stop.
    """
    from tdlm.studies.sweep import accelerate_commands, format_plan, load_sweep, run_sweep, slurm_script

    plan = load_sweep(sweep_file)
    runs = plan.select(patterns)
    if dry_run:
        click.echo(format_plan(plan, runs))
        return
    if emit == "accelerate":
        click.echo("\n".join(accelerate_commands(runs, launch_config)))
        return
    if emit == "slurm":
        script, commands = slurm_script(plan, runs, launch_config=launch_config, gpus=gpus, time_limit=time_limit)
        click.echo(script.read_text())
        click.echo(f"wrote {script} and {commands} ({len(runs)} runs); submit with: sbatch {script}", err=True)
        return
    if jobs > 1:
        from tdlm.studies.sweep_jobs import run_sweep_jobs

        outcome = run_sweep_jobs(runs, jobs, plan.out_dir / ".logs", echo=click.echo)
    else:
        outcome = run_sweep(runs, echo=click.echo)
    click.echo(f"\nsweep {plan.name}: " + ", ".join(f"{len(names)} {what}" for what, names in outcome.items())
               + f"; report: tdlm report {plan.out_dir}")
    for name in outcome["failed"]:
        click.echo(f"  failed: {name} (see its output above; rerun with --only {name})", err=True)
    if outcome["failed"] or outcome["stopped"]:
        sys.exit(1)


@cli.command()
@click.argument("runs_dirs", nargs=-1, required=True, type=click.Path())  # checked by find_runs
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for report.md, report.csv and the plots (default: the first RUNS_DIR).")
def report(runs_dirs, out_dir):
    """Tabulate and plot every run under RUNS_DIRS (searched recursively): final NELBO / NLL,
    perplexity, bits per byte against size, data and epochs, and diffusion vs AR by epochs."""
    from pathlib import Path

    from tdlm.studies.report import write_report

    markdown, written = write_report([Path(d) for d in runs_dirs], Path(out_dir or runs_dirs[0]),
                                     warn=lambda line: click.echo(line, err=True))
    click.echo(markdown)
    click.echo("wrote " + ", ".join(str(p) for p in written), err=True)


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def plugins(name, as_json):
    """List every installed component by kind, with the plugin and package that provide it; with
    NAME, that component's description and its options (type, default, what each does)."""
    from tdlm.registry import KINDS, build_registry

    registry = build_registry()
    if name is not None:
        _show_component(registry, name, as_json)
        return
    rows = [{"kind": c.kind, "name": c.name, "plugin": c.plugin, "package": c.package, "version": c.version,
             "options": sorted(c.config_cls.model_fields)} for c in registry.all()]
    if as_json:
        click.echo(dumps({"components": rows, "failed": registry.failed}))
        return
    for kind in KINDS:
        click.echo(f"{kind}s:")
        for row in (r for r in rows if r["kind"] == kind):
            options = f"  options: {', '.join(row['options'])}" if row["options"] else ""
            click.echo(f"  {row['name']:<18} {row['package']} {row['version']} ({row['plugin']}){options}")
    for plugin, error in registry.failed.items():
        click.echo(f"failed to load: {plugin}: {error}")
    click.echo("(tdlm plugins NAME: a component's options and what each does)")


def _show_component(registry, name: str, as_json: bool) -> None:
    """`tdlm plugins NAME`: every component of that name (a name may exist for several kinds)."""
    import difflib

    from tdlm.registry import describe_options

    found = [c for c in registry.all() if c.name == name]
    if not found:
        names = sorted({c.name for c in registry.all()})
        close = difflib.get_close_matches(name, names, n=1)
        _fail(f"no component named {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; installed: {', '.join(names)}")
    shown = [{"kind": c.kind, "name": c.name, "package": c.package, "version": c.version, "plugin": c.plugin,
              "doc": (c.cls.__doc__ or "").strip(), "options": describe_options(c.config_cls)} for c in found]
    if as_json:
        click.echo(dumps(shown, default=str))
        return
    for entry in shown:
        click.echo(f"{entry['kind']} {entry['name']} ({entry['package']} {entry['version']}, {entry['plugin']})")
        if entry["doc"]:
            click.echo("  " + entry["doc"].split("\n\n")[0].replace("\n", "\n  "))
        if not entry["options"]:
            click.echo("  no options")
        for option in entry["options"]:
            default = "required" if option["required"] else f"default {option['default']!r}"
            click.echo(f"  {option['name']}: {option['type']} ({default})")
            if option["doc"]:
                click.echo(f"      {option['doc']}")


@cli.command()
@click.option("--vocab", type=click.IntRange(min=2), default=4096, show_default=True)
@click.option("--d-model", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--n-layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--n-heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed steps per round and side.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed steps before each.")
@click.option("--objective", type=click.Choice(["diffusion", "ar"]), default="diffusion", show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds, engine and baseline alternating; medians are reported.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch (default: its own).")
@click.option("--recipe", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Take the model, batch, vocabulary size and objective from a recipe.")
@click.option("--suite", is_flag=True,
              help="The tiny and quick recipes, diffusion and AR, with projected wall times of their training.")
@click.option("--fused/--no-fused", default=False, show_default=True,
              help="On CUDA, use Liger's fused linear + cross-entropy kernel (when installed).")
@click.option("--compile/--no-compile", "compile", default=False, show_default=True,
              help="torch.compile both sides' network (the engine as training.compile does).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(as_json, device, recipe, suite, **settings):
    """Training tokens/s and MFU of the engine's train step vs a hand-written full-logits loop, as a ratio."""
    from tdlm.studies import bench as benchmark

    log = None if as_json else (lambda line: click.echo(line, err=True))
    settings.update(device=check_device(device), log=log)
    if suite:
        for key in ("vocab", "d_model", "n_layers", "n_heads", "batch", "seq_len", "objective"):
            settings.pop(key)
        results = benchmark.suite(**settings)
        click.echo(dumps(results) if as_json else benchmark.format_suite(results))
        return
    if recipe:
        settings.update(benchmark.recipe_settings(recipe))
    result = benchmark.measure(**settings)
    click.echo(dumps(result) if as_json else benchmark.format_result(result))


@cli.command("gen-eval")
@click.argument("run_dir", type=click.Path())  # checked by load_run: one message
@click.option("--sampler", default=None, help="Sampler name (default: the recipe's).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Sampler option, e.g. --option steps=64 (repeatable).")
@click.option("--num", type=click.IntRange(min=1), default=16, show_default=True, help="Samples to generate.")
@click.option("--length", type=click.IntRange(min=2), default=None, help="Tokens per sample, prompt included (default: seq_len).")
@click.option("--prompt", default=None, help="Text every sample starts with (not scored).")
@click.option("--reference", default=None, type=click.Path(file_okay=False),
              help="An autoregressive run (same tokenizer) that scores the samples: generative perplexity.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Samples per sampler call (default: all).")
@click.option("--collapse-prompt", "collapse_prompt_tokens", type=click.IntRange(min=1), default=None,
              help="Held-out prompt tokens before the masks of the frequency-collapse curve (default: length / 4).")
@click.option("--checkpoint", "which", default="best", show_default=True)
@click.option("--device", default=None)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for the JSON and PNG (default: RUN_DIR/geneval).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def gen_eval(run_dir, sampler, options, reference, which, device, out_dir, as_json, **settings):
    """Sample from a run and measure the text: NFE, tokens/s, generative perplexity, entropy,
    distinct-n, repetition, unseen bigrams, and the frequency-collapse curve (JSON + PNG)."""
    from pathlib import Path

    from tdlm.studies.geneval import GenEval, format_report, write_report

    parsed = sampler_options(options)
    check_seed(settings["seed"])
    evaluator = GenEval(run_dir, reference=reference, which=which, device=check_device(device))
    result = evaluator.evaluate(sampler=sampler, options=parsed, **settings)
    json_path, png_path = write_report(result, Path(out_dir) if out_dir else Path(run_dir) / "geneval")
    if as_json:
        click.echo(dumps({**result, "json": str(json_path), "png": str(png_path)}))
        return
    click.echo(format_report(result))
    click.echo(f"  sample 0: {result['samples'][0][:200]!r}")
    click.echo(f"saved {json_path} and {png_path}")


@cli.group()
def data():
    """Prepare data: tokenise a corpus once into shards that training streams."""


@data.command("prepare")
@click.argument("source")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@click.option("--seq-len", type=click.IntRange(min=2), required=True, help="Tokens per sequence (the recipe's data.seq_len).")
@click.option("--shard-size", type=click.IntRange(min=1), required=True, help="Sequences per shard.")
@click.option("--tokenizer", type=click.Choice(["gpt2", "bpe"]), default="gpt2", show_default=True)
@click.option("--bpe-vocab-size", type=click.IntRange(min=260), default=4096, show_default=True,
              help="Vocabulary of the BPE trained on the train split (--tokenizer bpe).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder holding wikitext-2/ and gpt2/ (default: $TDLM_DATA_DIR or ../shared/data).")
@click.option("--documents", type=click.Choice(["as-is", "wikitext-titles", "blank-lines"]), default="as-is",
              show_default=True, help="Where an end-of-text token ends a document (as the recipe key data.documents).")
@click.option("--force", is_flag=True, help="Replace the shards of an earlier prepare in --out.")
def prepare(source, out_dir, seq_len, shard_size, tokenizer, bpe_vocab_size, data_dir, documents, force):
    """Tokenise SOURCE (a folder with train.txt/valid.txt/test.txt, `wikitext2`, or
    hf:NAME[:CONFIG]) and write webdataset shards, a manifest and the tokenizer to --out."""
    from tdlm.data import prepare_shards

    manifest = prepare_shards(source, out_dir, seq_len=seq_len, shard_size=shard_size, tokenizer=tokenizer,
                              bpe_vocab_size=bpe_vocab_size, data_dir=data_dir, documents=documents, force=force)
    for split, entry in manifest["splits"].items():
        click.echo(f"{split}: {entry['tokens']:,} tokens, {entry['sequences']:,} sequences in "
                   f"{len(entry['shards'])} shards, {len(entry['tail'])} tail tokens")
    click.echo(f"wrote {out_dir} (tokenizer {manifest['tokenizer']['name']}); train from it with:\n\n"
               f'[data]\nformat = "webdataset"\npath = "{out_dir}"\nseq_len = {seq_len}')


cli.add_command(lm_eval_command)
cli.add_command(export_command)


def main():
    cli(prog_name="tdlm")


if __name__ == "__main__":
    main()
