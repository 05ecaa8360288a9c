"""The lm-evaluation-harness adapter (tdlm.studies.harness) on toy runs, offline, with a local task.

AR figures must be tdlm's own exact NLL; diffusion figures tdlm's own NELBO, here of the
continuation alone given the context (docs/maths.md section 1.12).
"""

import itertools
import json
import math
import sys

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from nets import Spy, ZeroLogits
from toydata import toy_recipe, write_toy_corpus

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from tdlm.cli import _Commands, cli  # noqa: E402
from tdlm.errors import TdlmError  # noqa: E402
from tdlm.studies.harness_cli import lm_eval_command  # noqa: E402


EXTRA = " ZQXJ ZQXJ ZQXJ"  # letters the toy corpus never holds: tokens the model never saw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A diffusion and an AR run on the toy corpus, 8 steps each (about 3 s)."""
    root = tmp_path_factory.mktemp("harness")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDLM_CACHE_DIR", str(root / "cache"))
        corpus = write_toy_corpus(root / "toy")
        for objective in ("diffusion", "ar"):
            recipe = toy_recipe(root / f"{objective}.toml", corpus, root / "runs", objective=objective)
            result = CliRunner().invoke(cli, ["run", str(recipe)], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    return {"diffusion": root / "runs" / "diffusion", "ar": root / "runs" / "ar", "cache": root / "cache"}


@pytest.fixture(autouse=True)
def offline(runs, monkeypatch, tmp_path):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(runs["cache"]))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def adapter(runs, objective, **options):
    from tdlm.studies.harness import TdlmLM

    return TdlmLM(run=str(runs[objective]), device="cpu", **options)


def request(*args, kind="loglikelihood"):
    return Instance(kind, {}, args, 0)


def loglikelihoods(lm, *pairs):
    return lm.loglikelihood([request(*pair) for pair in pairs], disable_tqdm=True)


def forced_task(folder, runs):
    """A multiple-choice task whose right answer is the continuation without EXTRA: AR's
    log p(c + e) = log p(c) + log p(e | c) < log p(c) for any model; see
    test_a_task_whose_answer_is_forced_scores_1 for diffusion."""
    docs = [("the cat likes", " the ball"), ("a dog sees", " a garden"), ("my friend paints", " an apple"),
            ("the river", " follows the city"), ("our team walks to", " the old house ."), ("", "a bird finds a song")]
    rows = []
    for i, (context, answer) in enumerate(docs):
        choices = [answer + EXTRA[: 5 * (j + 1)] for j in range(i % 3)]  # 0 to 2 wrong choices before the answer
        choices += [answer, answer + EXTRA]
        rows.append({"context": context, "choices": choices, "label": i % 3})
    data = folder / "forced.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "forced.yaml").write_text(f"""
task: tdlm_forced
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {folder / "datasets"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return rows


def lm_eval_cli(*args):
    """`tdlm lm-eval` inside a group that handles TdlmError as tdlm's own does."""
    @click.group(cls=_Commands)
    def group():
        pass

    group.add_command(lm_eval_command)
    return CliRunner().invoke(group, ["lm-eval", *map(str, args)])


# --- a task whose answer is forced ----------------------------------------------------------

def test_a_task_whose_answer_is_forced_scores_1_through_tdlm_lm_eval_ar(runs, tmp_path):
    forced_task(tmp_path, runs)
    out = lm_eval_cli(runs["ar"], "--tasks", "tdlm_forced", "--include-path", tmp_path, "--device", "cpu",
                      "--output", tmp_path / "all.json", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["results"]["tdlm_forced"]["acc,none"] == 1.0
    assert result["n-samples"]["tdlm_forced"]["effective"] == 6
    assert result["tdlm"]["is_bound"] is False and result["tdlm"]["objective"] == "AutoregressiveObjective"
    assert "configs" in json.loads((tmp_path / "all.json").read_text())


def test_a_task_whose_answer_is_forced_scores_1_through_lm_eval_s_registry_diffusion(runs, tmp_path):
    """Diffusion: the bound of c + e is not above that of c by any identity (the canvas grows and
    the denoiser sees e's masks), so the task forces the answer through e: tokens the model never
    saw, each costing about ln V = 5.7 nats or more, at 8 stratified t. The margins asserted
    below keep that visible."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import tdlm.studies.harness  # noqa: F401  registers "tdlm" with lm-eval
    from tdlm.data import load_corpus
    from tdlm.rundir import read_run_config, vocab_info

    rows = forced_task(tmp_path, runs)
    corpus = load_corpus(read_run_config(runs["diffusion"]).data, progress=False)
    assert (vocab_info(corpus).token_counts[corpus.vocab.encode(EXTRA.replace(" ", ""))] == 0).all()
    results = lm_eval.simple_evaluate(model="tdlm", model_args={"run": str(runs["diffusion"]), "device": "cpu",
                                                                "t_samples": 8},
                                      tasks=["tdlm_forced"], task_manager=TaskManager(include_path=str(tmp_path),
                                                                                      include_defaults=False))
    assert results["results"]["tdlm_forced"]["acc,none"] == 1.0
    lm = adapter(runs, "diffusion", t_samples=8)
    for row in rows:
        scores = [value for value, _ in loglikelihoods(lm, *[(row["context"], c) for c in row["choices"]])]
        right = scores[row["label"]]
        assert all(right - wrong > 15 for i, wrong in enumerate(scores) if i != row["label"]), scores


# --- AR: exactly tdlm's own NLL ---------------------------------------------------------------

TEXT = "the cat likes the ball .\na dog sees a garden .\nmy friend paints an apple .\nthe river follows the city .\n"


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_rolling_loglikelihood_is_tdlm_eval_text_s_figure(runs, tmp_path, objective):
    """The whole text (longer than seq_len: full sequences and a tail) scored as `tdlm eval --text`."""
    (tmp_path / "text.txt").write_text(TEXT)
    out = CliRunner().invoke(cli, ["eval", str(runs[objective]), "--text", str(tmp_path / "text.txt"), "--json",
                                   "--t-samples", "3", "--seed", "5", "--batch-size", "2"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output)
    assert figures["tokens"] > 32 and figures["sequences"] >= 2
    lm = adapter(runs, objective, t_samples=3, seed=5, batch_size=2)
    (rolling,) = lm.loglikelihood_rolling([request(TEXT, kind="loglikelihood_rolling")], disable_tqdm=True)
    assert rolling == pytest.approx(-figures["nll_per_token"] * figures["tokens"], rel=1e-12)


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_a_continuation_without_context_is_scored_as_tdlm_scores_it(runs, objective):
    """AR: the exact NLL of the tokens; diffusion: the same NELBO draws as `tdlm eval`'s batch 0."""
    from tdlm.data import pack
    from tdlm.evaluate import evaluate

    lm = adapter(runs, objective, t_samples=4, seed=11)
    text = "the cat likes the ball . a dog"
    tokens = np.asarray(lm.vocab.encode(text))
    assert len(tokens) < lm.seq_len
    figures = evaluate(lm.loaded.built.model, *pack(tokens, lm.seq_len), num_bytes=lm.loaded.corpus.num_bytes,
                       t_samples=4, seed=11)
    ((value, _),) = loglikelihoods(lm, ("", text))
    assert value == pytest.approx(-figures["nll_per_token"] * figures["tokens"], rel=1e-6, abs=1e-5)
    assert figures["is_bound"] is (objective == "diffusion") is lm.is_bound


def test_ar_loglikelihood_follows_the_chain_rule(runs):
    """log p(cont | ctx) = log p(ctx + cont) - log p(ctx): only the continuation's tokens count."""
    lm = adapter(runs, "ar")
    context, continuation = "the cat likes", " the ball ."
    ids, cont_ids = lm.encode_pair(context, continuation)
    assert ids + cont_ids == lm.vocab.encode(context + continuation) and len(cont_ids) == 3
    (conditional, _), (whole, _), (first, _) = loglikelihoods(lm, (context, continuation), ("", context + continuation),
                                                             ("", context))
    assert conditional == pytest.approx(whole - first, abs=1e-4)
    assert conditional < 0 and conditional != pytest.approx(whole, abs=1e-2)


def test_ar_context_is_cut_from_the_left_to_fit(runs):
    lm = adapter(runs, "ar")
    long_context = "the cat likes the ball . " * 20
    ids, cont = lm.encode_pair(long_context, " a dog")
    canvas = lm.canvas(ids, cont)
    kept = lm.seq_len - len(cont)
    assert len(canvas) == lm.seq_len and canvas == ids[-kept:] + cont
    ((value, _),) = loglikelihoods(lm, (long_context, " a dog"))
    assert math.isfinite(value) and value < 0
    with pytest.raises(TdlmError, match="longer than the run's sequence length"):
        loglikelihoods(lm, ("", " a dog" * 40))


# --- diffusion: what can break ----------------------------------------------------------------

def test_diffusion_bound_is_seeded_finite_and_positive(runs):
    pairs = [("the cat likes", " the ball"), ("a dog sees", " a garden ."), ("", "my friend")]
    first = loglikelihoods(adapter(runs, "diffusion", seed=3), *pairs)
    again = loglikelihoods(adapter(runs, "diffusion", seed=3), *pairs)
    other = loglikelihoods(adapter(runs, "diffusion", seed=4), *pairs)
    assert first == again
    assert all(math.isfinite(value) and value < 0 for value, _ in first)
    assert [value for value, _ in first] != [value for value, _ in other]


def test_diffusion_masks_only_the_continuation(runs):
    """An empty continuation scores 0 whatever the context; another context of the same length
    (so the same mask draws) changes the bound: the denoiser sees it, the bound does not count it."""
    lm = adapter(runs, "diffusion")
    a, b = lm.vocab.encode("the cat likes"), lm.vocab.encode("a bird sees")
    assert len(a) == len(b)
    (empty, greedy), (with_a, _), (with_b, _) = loglikelihoods(
        lm, ("the cat likes the ball", ""), ("the cat likes", " the ball"), ("a bird sees", " the ball"))
    assert empty == 0.0 and greedy
    assert with_a != with_b


def test_conditional_score_never_masks_the_context(build):
    objective = build(vocab_size=50, seq_len=16).model.objective
    x0 = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(0))
    maskable = torch.arange(16) >= torch.tensor([16, 12, 8, 4, 1, 0])[:, None]
    spy = Spy(ZeroLogits(50))
    scores = objective.score(spy, x0, generator=torch.Generator().manual_seed(1), t_samples=16, maskable=maskable)
    shown = torch.stack(spy.seen)  # [K, B, N]
    assert (shown[:, ~maskable] == x0[~maskable]).all()
    assert (shown[:, maskable] == 50).any()
    assert scores.nll[0] == 0 and (scores.nll[1:] > 0).all()


def test_conditional_bound_is_tight_for_the_exact_denoiser(build, exact_denoiser):
    """With the true conditionals, the bound on -log p(x_2 x_3 | x_0 x_1) is that number for every
    sequence (docs/maths.md section 1.12); the unconditional -log p(x) is far from it."""
    vocab_size, length, repeats = 3, 4, 8
    support = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.ones(len(support), dtype=torch.float64)).sample()
    built = build(vocab_size=vocab_size, seq_len=length)
    oracle = exact_denoiser(support, probs, vocab_size, built.vocab.mask_id)
    maskable = (torch.arange(length) >= 2).expand(len(support) * repeats, -1)
    scores = built.model.objective.score(oracle, support.repeat_interleave(repeats, 0), t_samples=100,
                                         generator=torch.Generator().manual_seed(2), maskable=maskable)
    bound = scores.nll.view(-1, repeats).mean(1)
    stderr = (scores.nll_var.view(-1, repeats).sum(1) / repeats**2).sqrt()
    prefix = support[:, 0] * vocab_size + support[:, 1]
    prefix_probs = torch.zeros(vocab_size**2, dtype=torch.float64).index_add_(0, prefix, probs)[prefix]
    truth = -(probs / prefix_probs).log()
    assert ((bound - truth).abs() / stderr).max() < 4.5
    assert ((bound + probs.log()).abs() / stderr).max() > 20


def test_a_corruption_with_dependent_masks_is_refused(build, monkeypatch):
    from tdlm.builtins.corruptions.uniform import UniformMasking

    monkeypatch.setattr(UniformMasking, "masks_independently", False)
    objective = build(vocab_size=50, seq_len=16).model.objective
    x0 = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(TdlmError, match="does not mask positions independently"):
        objective.score(ZeroLogits(50), x0, generator=torch.Generator(), t_samples=1,
                        maskable=torch.ones(1, 16, dtype=torch.bool))


# --- is_greedy agrees with tdlm's own greedy decoders -----------------------------------------

@pytest.mark.parametrize("objective, sampler, options", [("ar", "ar", {"top_k": 1}),
                                                         ("diffusion", "confidence", {"steps": 1})])
def test_is_greedy_is_what_the_greedy_sampler_writes(runs, objective, sampler, options):
    lm = adapter(runs, objective, sampler=sampler, sampler_options=options)
    context = lm.vocab.encode("the cat likes")
    canvas = torch.tensor([context + [lm.vocab.mask_id] * 4])
    written = lm.loaded.built.sampler.sample(lm.net, canvas, torch.Generator().manual_seed(0)).tokens[0].tolist()
    changed = written[:-1] + [(written[-1] + 1) % lm.vocab.size]
    _, greedy = lm.score_batch([written, changed], [4, 4], 0)
    assert greedy.tolist() == [True, False]


# --- generate_until -----------------------------------------------------------------------------

def test_generate_until_keeps_the_context_and_cuts_at_until(runs, monkeypatch):
    lm = adapter(runs, "ar", sampler="ar", sampler_options={"top_k": 1})
    seen, sampler = [], lm.loaded.built.sampler
    sample = sampler.sample
    monkeypatch.setattr(sampler, "sample", lambda net, canvas, g: seen.append(canvas) or sample(net, canvas, g))
    free, = lm.generate_until([request("the cat", {"max_gen_toks": 6}, kind="generate_until")], disable_tqdm=True)
    stop = free[2:4]
    cut, = lm.generate_until([request("the cat", {"until": [stop], "max_gen_toks": 6}, kind="generate_until")],
                             disable_tqdm=True)
    context = lm.vocab.encode("the cat")
    assert seen[0].shape == (1, len(context) + 6) and seen[0][0, :len(context)].tolist() == context
    assert (seen[0][0, len(context):] == lm.vocab.mask_id).all()
    assert free and cut == free[: free.index(stop)] and stop not in cut


# --- the command's errors: one line, exit 2 -----------------------------------------------------

def one_line_error(out, *fragments):
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdlm: error:") and "Traceback" not in out.output
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_without_lm_eval_the_command_says_how_to_install_it(runs, monkeypatch):
    import tdlm.studies

    monkeypatch.delitem(sys.modules, "tdlm.studies.harness", raising=False)
    monkeypatch.delattr(tdlm.studies, "harness", raising=False)
    for name in [name for name in sys.modules if name.split(".")[0] == "lm_eval"] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing lm_eval now raises ImportError
    one_line_error(lm_eval_cli(runs["ar"], "--tasks", "x"), 'pip install -e ".[lm-eval]"')


def test_unknown_task_and_missing_run(runs, tmp_path, monkeypatch):
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager  # lm-eval's own 15,000 tasks take seconds to index: left out here
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: real(**{**kw, "include_defaults": False}))
    forced_task(tmp_path, runs)
    one_line_error(lm_eval_cli(runs["ar"], "--tasks", "tdlm_forced,no_such_task", "--include-path", tmp_path),
                   "unknown task(s) no_such_task")
    one_line_error(lm_eval_cli(tmp_path / "nowhere", "--tasks", "tdlm_forced", "--include-path", tmp_path),
                   "not a tdlm run directory")
    one_line_error(lm_eval_cli(runs["ar"], "--tasks", "tdlm_forced", "--include-path", tmp_path, "--checkpoint", "99"),
                   "99")
