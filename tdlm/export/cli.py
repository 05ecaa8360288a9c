"""`tdlm export RUN DIR`: a click command of its own, added to the `tdlm` group in tdlm/cli.py."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", "which", default="best", show_default=True, help="best, last or a step number.")
@click.option("--push", "repo", default=None, metavar="REPO",
              help="Then upload the folder to this Hugging Face Hub model repository (OWNER/NAME).")
def export_command(run_dir, out_dir, which, repo):
    """Write a trained run as a self-contained Hugging Face model folder OUT_DIR: config, weights,
    tokenizer, model card, and model code that transformers loads with trust_remote_code (no tdlm
    needed). tdlm eval / sample / lm-eval read the folder back as a run."""
    from tdlm.export.push import check_repo, push_folder
    from tdlm.export.write import export_run

    if repo is not None:
        check_repo(repo)
    folder = export_run(run_dir, out_dir, which=which)
    click.echo(f"wrote {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))
    if repo is not None:
        click.echo(f"pushed {folder} to {repo}: {push_folder(folder, repo)}")
