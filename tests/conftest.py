"""Shared fixtures: the plugin registry, a builder for tiny models, and exact denoisers.

The exact denoisers know a toy data distribution (a finite support with probabilities) and
return its true conditionals, so an estimator or sampler can be checked against the truth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdlm.components import VocabInfo
from tdlm.config import RunConfig, resolve_components
from tdlm.lm import build_model
from tdlm.registry import build_registry


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Every tensor in the suite is tiny: one thread runs it faster than two (several times faster
    on a busy machine). Subprocesses the tests start get OMP_NUM_THREADS=1 where it matters."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gpt2_files():
    """The GPT-2 tokenizer files, found the way tdlm finds them, or skip: a clean checkout without
    the project's ../shared/data (and no hub) has none."""
    from tdlm.data import DataConfig
    from tdlm.data.locate import DataNotFoundError, find_gpt2_files

    try:
        return find_gpt2_files(DataConfig(tokenizer="gpt2"))
    except DataNotFoundError:
        pytest.skip("GPT-2 tokenizer files not found (set TDLM_DATA_DIR to the project's shared data)")


@pytest.fixture(scope="session")
def wikitext2_files(gpt2_files):
    """WikiText-2's split files (and the GPT-2 tokenizer's), found the way tdlm finds them, or skip."""
    from tdlm.data import DataConfig
    from tdlm.data.locate import DataNotFoundError, find_split_files

    try:
        return find_split_files(DataConfig(dataset="wikitext2", tokenizer="gpt2"))
    except DataNotFoundError:
        pytest.skip("WikiText-2 not found (set TDLM_DATA_DIR to the project's shared data)")


@pytest.fixture(scope="session")
def registry():
    return build_registry()


@pytest.fixture(scope="session")
def build(registry):
    """build(vocab_size=V, seq_len=N, schedule="cosine", sampler={"name": "ar", "top_k": 1}, ...)
    -> tdlm.lm.Built for a tiny model; no data needed. A string section is a component name."""

    def _build(*, vocab_size: int = 50, seq_len: int = 16, bos_id: int = 0, model=None, **sections):
        raw = {"data": {"seq_len": seq_len}, "model": model or {"d_model": 32, "n_heads": 4}}
        for key, value in sections.items():
            raw[key] = {"name": value} if isinstance(value, str) else value
        cfg = RunConfig.model_validate(raw)
        vocab = VocabInfo(size=vocab_size, mask_id=vocab_size, bos_id=bos_id)
        return build_model(cfg, resolve_components(cfg, registry), vocab)

    return _build


class ExactDenoiser(nn.Module):
    """Log p(x0_i = v | the unmasked tokens of x_t) for data on `support` [S, N] with `probs` [S].

    Unmasked positions get a point mass on their token; every logit is finite.
    """

    def __init__(self, support: torch.Tensor, probs: torch.Tensor, vocab_size: int, mask_id: int):
        super().__init__()
        self.mask_id = mask_id
        self.register_buffer("support", support)
        self.register_buffer("probs", probs.double() / probs.sum())
        self.register_buffer("onehot", F.one_hot(support, vocab_size).double())

    def forward(self, x):
        radix = (self.mask_id + 1) ** torch.arange(x.shape[1])  # few distinct x_t: compute once each
        codes, inverse = torch.unique((x * radix).sum(-1), return_inverse=True)
        states = codes[:, None] // radix % (self.mask_id + 1)
        agree = (states[:, None, :] == self.support) | (states[:, None, :] == self.mask_id)
        weight = self.probs * agree.all(-1)  # [U, S] posterior over the support, unnormalised
        cond = torch.einsum("us,snv->unv", weight, self.onehot)
        cond = cond / cond.sum(-1, keepdim=True).clamp_min(1e-300)
        return cond.clamp_min(1e-30).log()[inverse]


class ExactNextToken(nn.Module):
    """Causal oracle: input [BOS, x_0 .. x_{L-2}] -> at position i, log p(x_i | x_<i).

    Any other first token is an error: it would mean the caller does not shift by a BOS.
    """

    def __init__(self, support: torch.Tensor, probs: torch.Tensor, vocab_size: int, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.register_buffer("support", support)
        self.register_buffer("probs", probs.double() / probs.sum())
        self.register_buffer("onehot", F.one_hot(support, vocab_size).double())

    def forward(self, inputs):
        assert (inputs[:, 0] == self.bos_id).all(), "the first input must be BOS"
        length = inputs.shape[1]
        support = self.support[:, :length]
        eq = (inputs[:, None, 1:] == support[None, :, : length - 1]).double()  # [B, S, L-1]
        first = torch.ones(*eq.shape[:2], 1, dtype=eq.dtype)  # x_0 is predicted from BOS alone
        prefix_ok = torch.cat([first, eq.cumprod(-1)], dim=-1)  # [B, S, L]
        cond = torch.einsum("s,bsn,snv->bnv", self.probs, prefix_ok, self.onehot[:, :length])
        cond = cond / cond.sum(-1, keepdim=True).clamp_min(1e-300)
        return cond.clamp_min(1e-30).log()


@pytest.fixture(scope="session")
def exact_denoiser():
    return ExactDenoiser


@pytest.fixture(scope="session")
def exact_next_token():
    return ExactNextToken


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The toy text corpus (train/valid/test.txt), written once per test module."""
    from toydata import write_toy_corpus

    return write_toy_corpus(tmp_path_factory.mktemp("toy"))


@pytest.fixture
def toy_cache(tmp_path_factory, monkeypatch):
    """Token and tokenizer caches in the session's temporary folder, not the user's."""
    monkeypatch.setenv("TDLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


PAIR_SAMPLER = '[sampler]\nname = "ancestral"\nsteps = 8\n'  # the diffusion run's own sampler


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory):
    """A toy diffusion run and its AR twin, trained once per session (8 steps each, evals at 4 and
    8, final valid/test scores, the `ancestral` sampler with 8 steps for diffusion) on paragraphs of
    toy text with data.documents = "blank-lines" (so they saw <|endoftext|>: --stop-at-eos works).

    {"diffusion": run dir, "ar": run dir, "corpus": folder, "cache": TDLM_CACHE_DIR of the session}.
    READ-ONLY for every user: a test that resumes, damages or trains a run further copies it first
    (shutil.copytree) or trains its own."""
    from click.testing import CliRunner
    from toydata import toy_recipe, write_toy_corpus

    from tdlm.cli import cli

    root = tmp_path_factory.mktemp("pair")
    cache = tmp_path_factory.getbasetemp() / "cache"  # the folder toy_cache points at
    corpus = write_toy_corpus(root / "corpus", paragraph=5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDLM_CACHE_DIR", str(cache))
        for objective in ("diffusion", "ar"):
            recipe = toy_recipe(root / f"{objective}.toml", corpus, root / "runs", objective=objective,
                                extra=PAIR_SAMPLER if objective == "diffusion" else "")
            result = CliRunner().invoke(cli, ["run", str(recipe), "--set", "data.documents=blank-lines"],
                                        catch_exceptions=False)
            assert result.exit_code == 0, result.output
    return {"diffusion": root / "runs" / "diffusion", "ar": root / "runs" / "ar", "corpus": corpus, "cache": cache}

