"""A diffusion model trained with the default architecture uses context: its masked-token
cross-entropy is lower when few tokens are masked (t small) than when almost all are (t near 1,
where only the unigram distribution is left to learn)."""

import json

import pytest
from click.testing import CliRunner
from toydata import toy_recipe, write_toy_corpus

from tdlm.cli import cli



@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def masked_ce_by_t(result: dict) -> dict[float, float]:
    return {bucket["t"][0]: bucket["masked_ce"] for bucket in result["t_buckets"] if bucket["masked_ce"] is not None}


def test_default_diffusion_model_learns_context(tmp_path):
    corpus = write_toy_corpus(tmp_path / "toy", train_lines=2000)
    # the recipe's model section leaves positions, norm and MLP at their defaults
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs",
                        extra='[sampler]\nname = "ancestral"\nsteps = 4\n')
    result = CliRunner().invoke(cli, ["run", str(recipe), "--set", "training.max_steps=300",
                                      "--set", "training.eval_every=300", "--set", "training.batch_size=16",
                                      "--set", "eval.t_samples=16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    ce = masked_ce_by_t(summary["test"])
    low = (ce[0.0] + ce[0.1]) / 2  # t < 0.2: most of the sentence is visible
    assert low < ce[0.9] - 0.3, ce
