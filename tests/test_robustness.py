"""Runs and their files under stress, part two: data or a tokenizer changed under a run, a save
racing a reader, a full disk, damaged checkpoints and caches, user errors (one line, exit 2),
a SIGTERM during the final scoring, a shard damaged mid-training, reports with runs that have
no test figures, and a recipe switched to shards with --set."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from toydata import toy_recipe, write_toy_corpus

import tdlm.data.tokenizer
from tdlm.training import checkpointer as ckpt
from tdlm.cli import cli
from tdlm.data import DataConfig, load_corpus
from tdlm.training.monitor import read_metrics
from tdlm.training.trainer import Trainer

QUICK = ("--set", "eval.final_splits=[]")  # no final scoring: a toy run in ~2 s



@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("TDLM_CACHE_DIR", str(cache))
    return cache


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments, training: bool = False):
    """Exit code 2, no traceback, one line of output in all, on stderr, holding every fragment.
    `training`: the error came after training started, so the run's own lines come first."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    if training:
        lines = [line for line in lines if line.startswith("tdlm: error: ")]
    assert len(lines) == 1 and lines[0].startswith("tdlm: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A toy diffusion run of 8 steps (checkpoints at 4 and 8) and its recipe; read-only."""
    root = tmp_path_factory.mktemp("trained")
    recipe = toy_recipe(root / "r.toml", corpus, root / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        ok(invoke("run", recipe, *QUICK))
    return recipe, root / "runs" / "r"


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run (to damage), under tmp_path/runs/r, with its recipe."""
    recipe, run_dir = trained
    copy = tmp_path / "runs" / "r"
    shutil.copytree(run_dir, copy)
    text = recipe.read_text().replace(str(run_dir.parent), str(tmp_path / "runs"))
    (tmp_path / "r.toml").write_text(text)
    return tmp_path / "r.toml", copy


# -- 1. the data or the tokenizer changed under a run --------------------------------------------
@pytest.fixture
def own_corpus_run(tmp_path):
    """A run trained on its own copy of the toy corpus (to change it), stopped at step 4."""
    corpus = write_toy_corpus(tmp_path / "corpus")
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    ok(invoke("run", recipe, "--stop-at", 4))
    return recipe, corpus, tmp_path / "runs" / "r"


def test_a_run_records_its_data_and_a_changed_split_is_refused(own_corpus_run):
    recipe, corpus, run_dir = own_corpus_run
    record = json.loads((run_dir / "data.json").read_text())
    assert set(record["splits"]) == {"train", "valid", "test"} and record["tokenizer"]["vocab_sha256"]
    assert all(len(entry["text_sha256"]) == 64 and entry["tokens_sha256"] for entry in record["splits"].values())
    ok(invoke("eval", run_dir, "--t-samples", 1, "--json"))  # unchanged: fine

    original = (corpus / "valid.txt").read_text()
    (corpus / "valid.txt").write_text("the river sees a song .\n" * 40)
    for args in (["eval", run_dir, "--t-samples", 1], ["sample", run_dir, "--num", 1, "--length", 8],
                 ["run", recipe, "--resume"]):
        one_line_error(invoke(*args), "changed since it was trained", f"the valid text ({corpus / 'valid.txt'})",
                       "data.json")
    # a run from before data.json is not checked: it still loads
    (run_dir / "data.json").rename(run_dir / "data.json.old")
    ok(invoke("eval", run_dir, "--t-samples", 1, "--json"))
    (run_dir / "data.json.old").rename(run_dir / "data.json")
    (corpus / "valid.txt").write_text(original)
    ok(invoke("run", recipe, "--resume", *QUICK))


def test_a_tokenizers_upgrade_that_trains_another_bpe_is_refused(own_corpus_run, monkeypatch):
    """A `tokenizers` upgrade misses the BPE cache (its version is in the key) and trains the BPE
    again; simulated by a new version number and a trainer that merges differently."""
    recipe, corpus, run_dir = own_corpus_run
    before = json.loads((run_dir / "data.json").read_text())["tokenizer"]["tokenizers"]
    real_trainer = tdlm.data.tokenizer.trainers.BpeTrainer
    monkeypatch.setattr(tdlm.data.tokenizer.tokenizers, "__version__", "99.0.0")
    monkeypatch.setattr(tdlm.data.tokenizer.trainers, "BpeTrainer",
                        lambda **kwargs: real_trainer(**kwargs, max_token_length=3))
    for args in (["eval", run_dir, "--t-samples", 1], ["sample", run_dir, "--num", 1, "--length", 8],
                 ["run", recipe, "--resume"]):
        one_line_error(invoke(*args), "the tokenizer changed", f"tokenizers {before} -> 99.0.0")
    monkeypatch.undo()
    ok(invoke("eval", run_dir, "--t-samples", 1, "--json"))


# -- 2. reading a checkpoint while the run saves another --------------------------------------------
@pytest.mark.parametrize("saves, read", [(1, "step-0000008"), (3, "step-0000102")])
def test_eval_survives_a_save_that_prunes_the_checkpoint_it_is_reading(run_copy, monkeypatch, saves, read):
    """The pointer is read, then (before the files are opened) the training process saves
    `saves` checkpoints and prunes. One save: the previous checkpoint is still kept. Three: it is
    gone, and the reader follows the pointer to the new one."""
    _, run_dir = run_copy
    weights = ckpt.read_weights(run_dir / "checkpoints" / "step-0000008")
    real, raced = ckpt.checkpoint_dir, []

    def checkpoint_dir_then_a_concurrent_save(run, which="last"):
        path = real(run, which)
        if not raced:
            raced.append(path)
            for step in range(100, 100 + saves):
                ckpt.save_checkpoint(run_dir, step, weights, {"step": step}, pointers=("last", "best"))
            assert path.exists() == (saves == 1)
        return path

    monkeypatch.setattr(ckpt, "checkpoint_dir", checkpoint_dir_then_a_concurrent_save)
    result = ok(invoke("eval", run_dir, "--checkpoint", "last", "--t-samples", 1, "--json"))
    assert json.loads(result.stdout)["checkpoint"] == read and raced


def test_a_save_keeps_last_and_the_previous_checkpoint(run_copy):
    _, run_dir = run_copy
    weights = ckpt.read_weights(run_dir / "checkpoints" / "step-0000008")
    for step in (9, 10):
        ckpt.save_checkpoint(run_dir, step, weights, {"step": step})
    assert ckpt.read_pointer(run_dir, "last")["previous"] == "step-0000009"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == \
        ["step-0000008", "step-0000009", "step-0000010"]  # best (8), previous (9), last (10)


# -- 3. a full disk ----------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_removes_the_partial_checkpoint_and_keeps_last(tmp_path, corpus, monkeypatch):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"
    real = ckpt._write_state

    def disk_full_at_step_4(state, path):
        if state["step"] == 4:
            path.write_bytes(b"\x80" * 100)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(state, path)

    monkeypatch.setattr(ckpt, "_write_state", disk_full_at_step_4)
    one_line_error(invoke("run", recipe, "--set", "training.checkpoint_every=2"),
                   f"no space left in {run_dir / 'checkpoints'}", "step 4 was not written", "(step 2) is kept",
                   "--resume", training=True)
    assert not list((run_dir / "checkpoints").glob(".step-*")) and not ckpt.final_dir(run_dir, 4).exists()
    assert ckpt.read_pointer(run_dir, "last")["step"] == 2
    monkeypatch.undo()
    ok(invoke("run", recipe, "--resume", "--set", "training.checkpoint_every=2", *QUICK))  # lock released
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8


# -- 4. damaged files ------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.mark.parametrize("damaged, fragments", [
    ("checkpoints/step-0000008/model.safetensors", ["step-0000008/model.safetensors cannot be read",
                                                   "truncated or corrupt", "--checkpoint", "kept steps 4, 8"]),
    ("checkpoints/best.json", ["best.json is damaged", "--checkpoint STEP", "kept steps 4, 8"]),
])
def test_a_damaged_checkpoint_file_is_named_with_its_fix(run_copy, damaged, fragments):
    _, run_dir = run_copy
    _truncate(run_dir / damaged)
    one_line_error(invoke("eval", run_dir, "--t-samples", 1), *fragments)
    ok(invoke("eval", run_dir, "--t-samples", 1, "--checkpoint", 4, "--json"))  # the fix works


def test_a_damaged_config_json_is_read_from_config_toml_else_named(run_copy):
    _, run_dir = run_copy
    _truncate(run_dir / "config.json")
    result = ok(invoke("eval", run_dir, "--t-samples", 1))
    assert "config.json is damaged" in result.stderr and "read its copy" in result.stderr
    (run_dir / "config.toml").write_bytes(b"[run\x00")
    one_line_error(invoke("eval", run_dir), "config.json is damaged", "config.toml cannot be read either")


@pytest.mark.parametrize("damaged", ["step-0000006/state.pt", "step-0000006/model.safetensors", "last.json"])
def test_resume_falls_back_to_the_previous_checkpoint_when_last_is_unreadable(tmp_path, corpus, damaged):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"
    ok(invoke("run", recipe, "--stop-at", 4, *QUICK))
    ok(invoke("run", recipe, "--resume", "--stop-at", 6, *QUICK))
    assert ckpt.read_pointer(run_dir, "last") | {"val_nll": None} == {"step": 6, "dir": "step-0000006",
                                                                     "previous": "step-0000004", "val_nll": None}
    _truncate(run_dir / "checkpoints" / damaged)
    # saving every 2 steps, the resumed run saves step 6 again: it must not take the damaged directory for it
    result = ok(invoke("run", recipe, "--resume", "--stop-at", 7, "--set", "training.checkpoint_every=2", *QUICK))
    warning = next(line for line in result.stderr.splitlines() if "could not read" in line)
    fallback = "step-0000006" if damaged == "last.json" else "step-0000004"
    assert damaged.split("/")[-1] in warning and f"resuming from the newest readable checkpoint, {fallback}" in warning
    assert ckpt.read_pointer(run_dir, "last")["previous"] == "step-0000006"
    ckpt.load_state(run_dir / "checkpoints" / "step-0000006")  # readable: a new save, or the intact one
    ckpt.read_weights(run_dir / "checkpoints" / "step-0000006")
    if damaged != "last.json":  # set aside, not deleted
        assert (run_dir / "checkpoints" / ".unreadable-step-0000006").is_dir()
    ok(invoke("run", recipe, "--resume", *QUICK))
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8
    # the same figures as a run that was never interrupted
    again = toy_recipe(tmp_path / "again.toml", corpus, tmp_path / "runs")
    ok(invoke("run", again, *QUICK))
    strip = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in read_metrics(run_dir)]
    clean = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}
             for r in read_metrics(tmp_path / "runs" / "again")]
    assert strip == clean


def test_damaged_token_and_tokenizer_caches_are_rebuilt(tmp_path, corpus, capsys):
    cfg = DataConfig(dataset="text", path=str(corpus), tokenizer="bpe", bpe_vocab_size=300, seq_len=32)
    cache = tmp_path / "cache"
    first = load_corpus(cfg, cache_dir=cache, progress=False)
    entries = sorted((cache / "tokens").glob("valid-*.npy")) + sorted((cache / "tokenizers").glob("*.json"))
    assert len(entries) == 2
    for entry in entries:
        _truncate(entry)
    again = load_corpus(cfg, cache_dir=cache, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(warnings) == 2 and all(str(e) in "\n".join(warnings) for e in entries)
    assert all(np.array_equal(first.splits[s], again.splits[s]) for s in first.splits)
    assert again.vocab.name == first.vocab.name
    load_corpus(cfg, cache_dir=cache, progress=False)  # rebuilt on disk: no warning the third time
    assert "is damaged" not in capsys.readouterr().err


# -- 5. user errors: one line, exit code 2 -------------------------------------------------------------
def _bad_corpus(tmp_path, split, raw: bytes) -> Path:
    folder = write_toy_corpus(tmp_path / "bad-corpus")
    (folder / f"{split}.txt").write_bytes(raw)
    return folder


def _shards_manifest_without_keys(tmp_path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "tdlm-shards", "version": 1, "source": "x",
                                                      "seq_len": 32, "splits": {}}))
    return folder


LATIN1 = "caf\xe9 au lait .\n".encode("latin-1") * 500
USER_ERRORS = {
    # recipe values (`--check` catches them: nothing is loaded)
    "epochs-inf": (lambda c: ["run", c.recipe, "--check", "--set", "training.max_steps=none",
                              "--set", "training.epochs=inf"], "training.epochs"),
    "beta-1": (lambda c: ["run", c.recipe, "--check", "--set", "training.betas=[0.9, 1.0]"], "training.betas.1"),
    "beta-negative": (lambda c: ["run", c.recipe, "--check", "--set", "training.betas=[-0.1, 0.99]"],
                      "training.betas.0"),
    "lr-overflow": (lambda c: ["run", c.recipe, "--check", "--set", "training.lr=1e999"], "training.lr"),
    "lr-nan": (lambda c: ["run", c.recipe, "--check", "--set", "training.lr=nan"], "training.lr"),
    "seed-huge": (lambda c: ["run", c.recipe, "--check", "--set", f"run.seed={2**70}"], "run.seed"),
    "binary-recipe": (lambda c: ["run", c.write("b.toml", b"[run]\x00\x01\x02")], "looks binary"),
    "latin1-recipe": (lambda c: ["run", c.write("l.toml", "# r\xe9sum\xe9\n[run]\n".encode("latin-1"))],
                      "is not UTF-8 text (byte 3"),
    "manifest-keys": (lambda c: ["run", c.recipe, "--check", "--set", "data.format=webdataset",
                                 "--set", f'data.path="{_shards_manifest_without_keys(c.tmp)}"'],
                      "lacks or mistypes shard_size, tokenizer"),
    "out-dir-a-file": (lambda c: ["run", c.recipe, "--set", f'run.out_dir="{c.write("f", b"")}"'], "is a file"),
    "out-dir-a-file-check": (lambda c: ["run", c.recipe, "--check", "--set", f'run.out_dir="{c.write("f", b"")}"'],
                             "is a file"),
    # data the recipe cannot train on (found when the data is loaded, before any step)
    "seq-len-too-long": (lambda c: ["run", c.recipe, "--set", "data.seq_len=100000"],
                         "only 0 sequences of length 100000"),
    "batch-too-big": (lambda c: ["run", c.recipe, "--set", "training.batch_size=100000"],
                      "fewer than one global batch of 100000"),
    "empty-valid": (lambda c: ["run", c.recipe, "--set", f'data.path="{_bad_corpus(c.tmp, "valid", b"")}"'],
                    "the valid split", "holds no tokens"),
    "latin1-train": (lambda c: ["run", c.recipe, "--set", f'data.path="{_bad_corpus(c.tmp, "train", LATIN1)}"'],
                     "train.txt is not UTF-8 text"),
    "cache-a-file": (lambda c: c.env("TDLM_CACHE_DIR", c.write("cache", b"")) or ["run", c.recipe], "is a file"),
    # commands on a trained run
    "speculative-no-draft": (lambda c: ["sample", c.run, "--sampler", "speculative", "--num", 1, "--length", 8],
                             "needs a draft model"),
    "device-foo": (lambda c: ["eval", c.run, "--device", "foo"], "--device 'foo' is not a device"),
    "device-cuda": (lambda c: ["sample", c.run, "--device", "cuda"], "--device cuda"),
    "huge-mask-span": (lambda c: ["sample", c.run, "--template", "a<mask:999999999>"], "999999999 tokens"),
    "endless-mask-span": (lambda c: ["sample", c.run, "--template", "<mask:" + "9" * 5000 + ">"], "5000-digit"),
    "huge-length": (lambda c: ["sample", c.run, "--length", 10**12], "--length 1000000000000 is more"),
    "seed-overflow": (lambda c: ["eval", c.run, "--seed", 2**70], "--seed"),
    "checkpoint-first": (lambda c: ["eval", c.run, "--checkpoint", "first"],
                         "no checkpoint 'first'", "best, last or a step number", "best (step 8)", "kept steps 4, 8"),
    "checkpoint-pruned": (lambda c: ["sample", c.run, "--checkpoint", 2], "no checkpoint of step 2",
                          "last (step 8)", "kept steps 4, 8"),
}


class Case:
    def __init__(self, tmp, recipe, run, monkeypatch):
        self.tmp, self.recipe, self.run, self.monkeypatch = tmp, recipe, run, monkeypatch

    def write(self, name: str, raw: bytes) -> Path:
        (self.tmp / name).write_bytes(raw)
        return self.tmp / name

    def env(self, key: str, value) -> None:
        self.monkeypatch.setenv(key, str(value))


@pytest.mark.parametrize("name", USER_ERRORS)
def test_user_errors_are_one_line_and_exit_code_2(name, trained, tmp_path, monkeypatch):
    if name == "device-cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    recipe, run_dir = trained
    own = toy_recipe(tmp_path / "r.toml", Path(json.loads((run_dir / "config.json").read_text())["data"]["path"]),
                     tmp_path / "runs")
    build, *fragments = USER_ERRORS[name]
    args = build(Case(tmp_path, own, run_dir, monkeypatch))
    one_line_error(invoke(*args), *fragments)
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()  # nothing was trained


# -- 6. a SIGTERM during the final scoring; a shard damaged mid-training ----------------------------------
def test_sigterm_during_the_final_scoring_stops_it_at_once(tmp_path, corpus, monkeypatch):
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"
    scored, finishing = [], []
    real_finish = Trainer.finish

    def finish(self, status, bar):
        finishing.append(status)
        return real_finish(self, status, bar)

    def counting(score):
        def wrapped(*args, **kwargs):
            if finishing:
                scored.append(1)
                if len(scored) == 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first batch is scored
            return score(*args, **kwargs)
        return wrapped

    import tdlm.training.evaluator

    real_evaluate = tdlm.training.evaluator.evaluate

    def evaluate(model, *args, **kwargs):
        model.objective.score = type(model.objective).score.__get__(model.objective)
        if kwargs["split"] == "test":  # valid is scored in full first
            model.objective.score = counting(model.objective.score)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "finish", finish)
    monkeypatch.setattr(tdlm.training.evaluator, "evaluate", evaluate)
    result = ok(invoke("run", recipe, "--set", "eval.batch_size=1"))  # ~25 batches of test scoring
    assert len(scored) == 1, f"{len(scored)} batches of test scored, the SIGTERM came in the first"
    assert "stopped at step 8 of 8" in result.stdout and "--resume" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and "test" not in summary
    monkeypatch.undo()
    ok(invoke("run", recipe, "--resume"))  # scores it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test"]["tokens"] > 0
    kinds = [r["kind"] for r in read_metrics(run_dir)]
    assert kinds.count("final_valid") == 1 and kinds.count("final_test") == 1  # the first scoring's are replaced


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus):
    """The toy corpus as shards: BPE of 300 ids, sequences of 32 tokens, 20 per shard."""
    from tdlm.data import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "toy"
    prepare_shards(str(corpus), out, seq_len=32, shard_size=20, tokenizer="bpe", bpe_vocab_size=300,
                   cache_dir=tmp_path_factory.getbasetemp() / "cache", progress=False)
    return out


def test_a_shard_damaged_mid_training_saves_the_steps_done_then_stops(tmp_path, corpus, shards, monkeypatch):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs")
    to_shards = ["--set", "data.format=webdataset", "--set", f'data.path="{folder}"', *QUICK]
    run_dir = tmp_path / "runs" / "r"
    real_step = Trainer.run_step

    def step(self):
        loss = real_step(self)
        if self.step == 4:  # step 5 done: every train shard on disk is damaged now
            for shard in folder.glob("train-*.tar"):
                shard.write_bytes(b"\x00" * 10)
            self.stream._cache.clear()
        return loss

    monkeypatch.setattr(Trainer, "run_step", step)
    line = one_line_error(invoke("run", recipe, "--set", "training.eval_every=4", *to_shards),
                          "train-0", "is truncated or corrupt", "tdlm data prepare",
                          "training stopped at step 5 and saved a checkpoint there", "--resume", training=True)
    assert "\n" not in line
    assert ckpt.read_pointer(run_dir, "last")["step"] == 5  # not 4: the fifth step is kept
    monkeypatch.undo()
    for shard in shards.glob("train-*.tar"):
        shutil.copy(shard, folder / shard.name)
    ok(invoke("run", recipe, "--resume", "--set", "training.eval_every=4", *to_shards))
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8


# -- 7. tdlm report with runs that have no test figures ----------------------------------------------
def test_report_compares_every_pair_that_has_figures(tmp_path):
    from test_report import SWEEP, fabricate_run

    from tdlm.studies.report import comparison_lines, find_runs

    root = tmp_path / "runs"
    for epochs, (diffusion, ar) in SWEEP.items():
        fabricate_run(root / f"diffusion-ep{epochs}", objective="diffusion", epochs=epochs, test_nll=diffusion)
        fabricate_run(root / f"ar-ep{epochs}", objective="ar", epochs=epochs, test_nll=ar)
    # finished with eval.final_splits = []: no figures at all
    fabricate_run(root / "diffusion-ep256", objective="diffusion", epochs=256, test_nll=None)
    # a pair scored on valid only
    fabricate_run(root / "diffusion-ep2", objective="diffusion", epochs=2, test_nll=None, valid_nll=6.3)
    fabricate_run(root / "ar-ep2", objective="ar", epochs=2, test_nll=None, valid_nll=4.9)
    lines = comparison_lines(find_runs([root]))
    text = "\n".join(lines)
    assert "No finished diffusion run" not in text
    assert "on the test split (valid where a pair has no test figures)" in lines[0]
    pairs = [line for line in lines if line.startswith("- ")]
    assert len(pairs) == 5 and sum("[valid]" in line for line in pairs) == 1
    assert "2 epochs" in next(line for line in pairs if "[valid]" in line)
    assert "first at 64 epochs, of 1, 2, 4, 16, 64" in text


# -- 8. a recipe switched to shards with --set ----------------------------------------------------------
def test_a_recipe_switched_to_shards_takes_their_tokenizer(tmp_path, corpus, shards):
    text = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs").read_text()
    gpt2 = tmp_path / "gpt2.toml"  # the default tokenizer (gpt2): the shards' BPE replaces it silently
    gpt2.write_text(text.replace('tokenizer = "bpe"\nbpe_vocab_size = 300\n', ""))
    to_shards = ["--set", "data.format=webdataset", "--set", f'data.path="{shards}"']
    checked = ok(invoke("run", gpt2, "--check", *to_shards))
    assert 'tokenizer = "bpe"\nbpe_vocab_size = 300\n' in checked.stdout and not checked.stderr
    other = ok(invoke("run", tmp_path / "r.toml", "--check", *to_shards, "--set", "data.bpe_vocab_size=512"))
    assert "bpe_vocab_size = 300" in other.stdout
    assert "data.bpe_vocab_size = 512 is not used" in other.stderr  # a value given and overridden: said
    ok(invoke("run", gpt2, *to_shards, "--set", "training.max_steps=2", *QUICK))
    saved = json.loads((tmp_path / "runs" / "gpt2" / "config.json").read_text())["data"]
    assert (saved["format"], saved["tokenizer"], saved["bpe_vocab_size"]) == ("webdataset", "bpe", 300)
    assert json.loads((tmp_path / "runs" / "gpt2" / "data.json").read_text())["format"] == "webdataset"
    ok(invoke("run", gpt2, *to_shards, "--resume", "--set", "training.max_steps=4", *QUICK))  # same run
    capped = invoke("run", gpt2, "--check", *to_shards, "--set", "data.max_train_tokens=100")
    one_line_error(capped, "remove max_train_tokens", "--set data.max_train_tokens=none")
