"""`training.init_from`: a run starts from another run's checkpoint or an exported folder; shapes
and tokenizer are checked in one line; the source is recorded; a resume never reads it again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from toydata import toy_recipe, write_toy_corpus

from tdlm.cli import cli

ROOT = Path(__file__).resolve().parent.parent
TINY_LR = "training.lr=1e-12"  # one step of AdamW moves no weight by more than ~1e-12: step 1 holds the start


def tdlm(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A toy AR run (4 steps, checkpoints at 2 and 4) and the diffusion recipe of the same data."""
    root = tmp_path_factory.mktemp("init")
    cache = tmp_path_factory.getbasetemp() / "cache"
    corpus = write_toy_corpus(root / "corpus")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDLM_CACHE_DIR", str(cache))
        recipe = toy_recipe(root / "ar.toml", corpus, root / "runs", objective="ar")
        code, output = tdlm("run", recipe, "--set", "training.max_steps=4", "--set", "training.eval_every=2")
        assert code == 0, output
    diffusion = toy_recipe(root / "diffusion.toml", corpus, root / "runs")
    return {"root": root, "ar": root / "runs" / "ar", "recipe": diffusion, "corpus": corpus, "cache": cache}


@pytest.fixture
def env(source, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(source["cache"]))
    monkeypatch.chdir(source["root"])  # relative init_from paths resolve from here
    return source


def net_weights(path: Path) -> dict:
    return {k: v for k, v in load_file(path / "model.safetensors").items() if k.startswith("net.")}


def export_folder(run: Path, out: Path, which: str = "last") -> Path:
    """`tdlm export` of checkpoint `which` of `run` (the folder it writes, nothing made by hand)."""
    code, output = tdlm("export", run, out, "--checkpoint", which)
    assert code == 0, output
    return out


@pytest.mark.parametrize("kind", ["run", "export"])
def test_a_run_starts_from_the_sources_weights_and_records_the_source(env, kind, tmp_path):
    if kind == "run":
        spec, weights_dir = "runs/ar@last", env["ar"] / "checkpoints" / "step-0000004"
        expected_spec = str(env["root"] / "runs" / "ar") + "@last"
    else:
        folder = export_folder(env["ar"], tmp_path / "exported")
        spec, weights_dir, expected_spec = str(folder), folder, str(folder)
    name = f"from_{kind}"
    code, output = tdlm("run", env["recipe"], "--set", f"run.name={name}", "--set", f'training.init_from="{spec}"',
                        "--set", "model.shift_logits=true", "--set", TINY_LR, "--stop-at", 1)
    assert code == 0, output
    run = env["root"] / "runs" / name
    source, started = net_weights(weights_dir), net_weights(run / "checkpoints" / "step-0000001")
    assert source.keys() == started.keys()
    for key in source:
        torch.testing.assert_close(started[key], source[key], atol=1e-8, rtol=0, msg=key)
    assert json.loads((run / "config.json").read_text())["training"]["init_from"] == expected_spec
    record = json.loads((run / "data.json").read_text())
    ar_record = json.loads((env["ar"] / "data.json").read_text())
    assert record["init_from"]["step"] == 4 and record["init_from"]["kind"] == kind
    assert record["init_from"]["checkpoint"] == "step-0000004" and record["init_from"]["objective"] == "ar"
    assert record["init_from"]["tokenizer"] == ar_record["tokenizer"] == record["tokenizer"]
    assert record["init_from"]["splits"]["train"]["tokens_sha256"] == ar_record["splits"]["train"]["tokens_sha256"]


def test_an_export_that_cannot_serve_is_refused_in_one_line(env, tmp_path):
    folder = export_folder(env["ar"], tmp_path / "exported")
    args = ["run", env["recipe"], "--set", "run.name=never", "--check"]
    code, output = tdlm(*args, "--set", f'training.init_from="{folder}@last"')
    assert code == 2 and "is an exported model, which holds one set of weights; drop '@last'" in output, output
    bare = tmp_path / "bare"  # the Hugging Face part of an export, without tdlm_run.json
    bare.mkdir()
    shutil.copy(folder / "config.json", bare)
    shutil.copy(folder / "model.safetensors", bare)
    code, output = tdlm(*args, "--set", f'training.init_from="{bare}"')
    assert code == 2 and output.count("\n") == 1 and "no tdlm_run.json" in output, output
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    code, output = tdlm(*args, "--set", f'training.init_from="{damaged}"')
    assert code == 2 and output.count("\n") == 1 and "truncated or corrupt" in output, output
    assert not (env["root"] / "runs" / "never").exists()


def test_a_source_of_another_shape_is_one_line_naming_the_tensors(env):
    code, output = tdlm("run", env["recipe"], "--set", "run.name=wide", "--set", 'training.init_from="runs/ar"',
                        "--set", "model.d_model=64")
    assert code == 2 and output.count("\n") == 1, output
    assert "net.tok_emb.weight is [301, 32] there and [301, 64] here" in output
    assert not (env["root"] / "runs" / "wide").exists()  # nothing was trained
    code, output = tdlm("run", env["recipe"], "--set", "run.name=wide", "--set", 'training.init_from="runs/ar"',
                        "--set", "model.d_model=64", "--check")
    assert code == 2 and "model.d_model is 32 there and 64 here" in output, output


def test_a_source_with_another_tokenizer_is_refused_at_check_and_at_start(env, tmp_path):
    # the same BPE size trained on other text: every shape fits, the token ids mean other tokens
    other = write_toy_corpus(tmp_path / "other", seed=5)
    args = ["run", env["recipe"], "--set", "run.name=other_text", "--set", f'data.path="{other}"',
            "--set", 'training.init_from="runs/ar"']
    for extra in (["--check"], []):
        code, output = tdlm(*args, *extra)
        assert code == 2 and output.count("\n") == 1, output
        assert "its tokenizer (bpe300-" in output and "is not this recipe's (bpe300-" in output
    assert not (env["root"] / "runs" / "other_text").exists()


def test_a_resume_loads_its_own_checkpoint_and_keeps_its_source(env, tmp_path):
    shutil.copytree(env["ar"], tmp_path / "ar_copy")
    spec = f'training.init_from="{tmp_path / "ar_copy"}"'
    base = ["run", env["recipe"], "--set", "run.name=resumed", "--set", spec, "--set", "model.shift_logits=true"]
    code, output = tdlm(*base, "--stop-at", 2)
    assert code == 0, output
    shutil.rmtree(tmp_path / "ar_copy")  # the source is gone: the resume must not need it
    code, output = tdlm(*base, "--stop-at", 3, "--resume")
    assert code == 0, output
    code, output = tdlm("run", env["recipe"], "--set", "run.name=resumed", "--set", 'training.init_from="runs/ar"',
                        "--set", "model.shift_logits=true", "--resume")
    assert code == 2 and "training.init_from:" in output, output


def test_fine_tuning_on_another_text_folder_with_a_tokenizer_that_does_not_depend_on_the_text(env, tmp_path, gpt2_files):
    """The GPT-2 tokenizer is the same on every text, so an AR model of one folder starts a
    diffusion model of another."""
    first, second = write_toy_corpus(tmp_path / "first", train_lines=120), write_toy_corpus(tmp_path / "second", seed=9,
                                                                                            train_lines=120)
    gpt2 = ["--set", 'data.tokenizer="gpt2"', "--set", "training.max_steps=2", "--set", "training.eval_every=2",
            "--set", 'eval.final_splits=["test"]']
    ar = toy_recipe(tmp_path / "ar_first.toml", first, tmp_path / "runs", objective="ar")
    code, output = tdlm("run", ar, *gpt2)
    assert code == 0, output
    diffusion = toy_recipe(tmp_path / "tuned.toml", second, tmp_path / "runs")
    code, output = tdlm("run", diffusion, *gpt2, "--set", f'training.init_from="{tmp_path / "runs" / "ar_first"}"',
                        "--set", "model.shift_logits=true")
    assert code == 0, output
    record = json.loads((tmp_path / "runs" / "tuned" / "data.json").read_text())
    assert record["init_from"]["tokenizer"]["name"] == record["tokenizer"]["name"] == "gpt2"
    assert record["init_from"]["splits"]["train"]["text_sha256"] != record["splits"]["train"]["text_sha256"]


def test_the_adaptation_options_are_refused_for_an_ar_objective(env):
    code, output = tdlm("run", env["recipe"], "--set", 'objective.name="ar"', "--set", "model.shift_logits=true",
                        "--set", "training.attention_anneal_steps=10", "--check")
    assert code == 2 and "model.shift_logits is for a diffusion objective" in output
    assert "training.attention_anneal_steps" in output


def test_the_from_ar_recipe_is_the_quick_one_started_from_its_ar_twin():
    from tdlm.config import read_recipe

    quick = read_recipe(ROOT / "recipes/quick_wikitext2.toml").model_dump()
    adapted = read_recipe(ROOT / "recipes/quick_wikitext2_from_ar.toml").model_dump()
    differing = {section: {k for k in quick[section] if quick[section][k] != adapted[section][k]}
                 for section in quick if quick[section] != adapted[section]}
    assert differing == {"run": {"name"}, "model": {"shift_logits"},
                         "training": {"init_from", "attention_anneal_steps"}}
    assert adapted["training"]["init_from"] == "runs/quick_wikitext2_ar" and adapted["model"]["shift_logits"]


def test_an_annealed_run_resumed_gives_the_uninterrupted_runs_losses(env):
    """The attention pattern of a step is drawn from that step's seeded generator: a resume draws it again."""
    adapted = ["--set", 'training.init_from="runs/ar"', "--set", "model.shift_logits=true",
               "--set", "training.attention_anneal_steps=6", "--set", "training.max_steps=4"]

    def losses(name):
        rows = [json.loads(line) for line in (env["root"] / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    code, output = tdlm("run", env["recipe"], "--set", "run.name=annealed", *adapted)
    assert code == 0, output
    code, output = tdlm("run", env["recipe"], "--set", "run.name=annealed_resumed", *adapted, "--stop-at", 2)
    assert code == 0, output
    code, output = tdlm("run", env["recipe"], "--set", "run.name=annealed_resumed", *adapted, "--resume")
    assert code == 0, output
    assert losses("annealed") == losses("annealed_resumed") and len(losses("annealed")) == 2
