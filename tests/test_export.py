"""`tdlm export`: a run as a Hugging Face folder that transformers loads without tdlm (same logits),
and that tdlm's commands read back as the run (same figures, same samples)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tdlm.cli import cli

pytest.importorskip("transformers")

V, N = 50, 16  # the option tests' tiny vocabulary and sequence length


def tdlm_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(trained_pair, tmp_path_factory):
    """The toy pair exported once per module: {"diffusion": folder, "ar": folder, **trained_pair}."""
    root = tmp_path_factory.mktemp("exported")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))
        for objective in ("diffusion", "ar"):
            result = tdlm_cli("export", trained_pair[objective], root / objective)
            assert result.exit_code == 0, result.output
    return {**trained_pair, "export-diffusion": root / "diffusion", "export-ar": root / "ar"}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture
def pair_cache(exported, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(exported["cache"]))


def loaded(folder):
    from tdlm.rundir import load_run

    return load_run(folder)


# --- the folder -----------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_the_folder_holds_the_run_under_tdlm_s_own_names(exported, pair_cache, objective):
    from safetensors.torch import load_file

    from tdlm.hf import standalone_sources
    from tdlm.model import ModelConfig
    from tdlm.training.checkpointer import checkpoint_dir, read_weights

    run, folder = exported[objective], exported[f"export-{objective}"]
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "model.safetensors", "configuration_tdlm.py", "modeling_tdlm.py", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "README.md", "tdlm_run.json",
        "diffusion_config.json" if objective == "diffusion" else "generation_config.json"}
    # the contract: the weights are a checkpoint's model.safetensors, name for name and bit for bit
    weights, checkpoint = load_file(folder / "model.safetensors"), read_weights(checkpoint_dir(run, "best"))
    assert weights.keys() == checkpoint.keys() == loaded(run).built.model.state_dict().keys()
    assert all(torch.equal(weights[k], checkpoint[k]) for k in weights)
    config = json.loads((folder / "config.json").read_text())
    causal = objective == "ar"
    assert config["model_type"] == "tdlm" and config["causal"] is causal and config["objective"] == objective
    assert set(ModelConfig.model_fields) <= set(config)
    assert (config["vocab_size"], config["mask_id"], config["eot_id"], config["max_len"]) == (300, 300, 0, 32)
    auto = "AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"
    assert config["auto_map"][auto].startswith("modeling_tdlm.")
    assert all((folder / name).read_text() == text for name, text in standalone_sources().items())
    run_file = json.loads((folder / "tdlm_run.json").read_text())
    assert run_file["recipe"] == json.loads((run / "config.json").read_text())
    assert run_file["data"] == json.loads((run / "data.json").read_text())
    assert run_file["checkpoint"] == {"name": "step-0000008", "step": 8, "which": "best"}


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_the_model_card_names_the_figure_for_what_it_is(exported, objective):
    card = (exported[f"export-{objective}"] / "README.md").read_text()
    test = json.loads((exported[objective] / "summary.json").read_text())["test"]
    row = next(line for line in card.splitlines() if line.startswith("| test |"))
    assert f"{test['nll_per_token']:.4f}" in row
    if objective == "diffusion":
        assert "NELBO (upper bound)" in row and "upper bound on the negative log-likelihood" in card
    else:
        assert "NLL (exact)" in row and "exact negative log-likelihood" in card
    data = json.loads((exported[objective] / "data.json").read_text())
    assert data["splits"]["test"]["text_sha256"] in card and data["tokenizer"]["vocab_sha256"] in card
    assert "[model]" in card and 'name = "' + objective + '"' in card  # the recipe


# --- back into tdlm ---------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_eval_of_the_export_gives_the_run_s_figures(exported, pair_cache, objective):
    figures = []
    for folder in (exported[objective], exported[f"export-{objective}"]):
        result = tdlm_cli("eval", folder, "--split", "test", "--json", "--device", "cpu")
        assert result.exit_code == 0, result.output
        figures.append({k: v for k, v in json.loads(result.stdout).items() if k not in ("run", "checkpoint")})
    assert figures[0] == figures[1]
    assert figures[0]["nll_per_token"] == pytest.approx(
        json.loads((exported[objective] / "summary.json").read_text())["test"]["nll_per_token"])


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_sample_of_the_export_with_the_same_seed_writes_the_same_text(exported, pair_cache, objective):
    texts = []
    for folder in (exported[objective], exported[f"export-{objective}"]):
        result = tdlm_cli("sample", folder, "--num", "2", "--length", "12", "--seed", "5", "--json", "--device", "cpu")
        assert result.exit_code == 0, result.output
        texts.append(json.loads(result.stdout)["samples"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_lm_eval_scores_the_export_as_the_run(exported, pair_cache, objective):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from tdlm.studies.harness import TdlmLM

    requests = [Instance("loglikelihood", {}, pair, 0) for pair in (("the cat likes", " the ball"), ("", "a dog ."))]
    scores = [TdlmLM(run=str(folder), device="cpu").loglikelihood(requests, disable_tqdm=True)
              for folder in (exported[objective], exported[f"export-{objective}"])]
    assert scores[0] == scores[1]


def test_read_folder_gives_recipe_weights_and_data(exported):
    from tdlm.config import RunConfig
    from tdlm.export import read_folder

    recipe, state_dict, data, info = read_folder(exported["export-diffusion"])
    assert RunConfig.model_validate(recipe).objective.name == "diffusion"
    assert "net.tok_emb.weight" in state_dict and data["version"] == 1 and info["checkpoint"]["step"] == 8


def test_an_exported_folder_is_refused_in_one_line_where_it_cannot_serve(exported, pair_cache, tmp_path):
    folder = exported["export-ar"]
    wrong = tdlm_cli("eval", folder, "--checkpoint", "3")
    assert wrong.exit_code == 2 and "an exported folder holds one, step 8" in wrong.output
    assert tdlm_cli("eval", folder, "--checkpoint", "8", "--json", "--device", "cpu").exit_code == 0
    bare = tmp_path / "bare"  # a Hugging Face folder of a tdlm model without the recipe
    bare.mkdir()
    shutil.copy(folder / "config.json", bare)
    result = tdlm_cli("sample", bare)
    assert result.exit_code == 2 and "no tdlm_run.json" in result.output
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    result = tdlm_cli("eval", damaged)
    assert result.exit_code == 2 and "truncated or corrupt" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_export_never_overwrites_and_refuses_what_it_cannot_carry(exported, pair_cache, tmp_path):
    result = tdlm_cli("export", exported["diffusion"], exported["export-diffusion"])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    # a sampler that drafts with another run's network: one folder cannot carry two models
    run = tmp_path / "drafting"
    shutil.copytree(exported["diffusion"], run)
    config = json.loads((run / "config.json").read_text())
    config["sampler"] = {"name": "speculative", "draft": str(exported["diffusion"])}
    (run / "config.json").write_text(json.dumps(config))
    result = tdlm_cli("export", run, tmp_path / "out")
    assert result.exit_code == 2 and "drafts with another run's model" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not any(p.name.endswith("export-tmp") for p in tmp_path.iterdir())


def test_component_tensors_outside_the_state_dict_are_found(build):
    from tdlm.export.write import outside_state

    built = build(corruption={"name": "state-dependent", "weights": "learned"})
    assert outside_state(built) == []  # its learned weights are a parameter: in model.safetensors
    assert "objective.corruption.param" in built.model.state_dict()
    built.model.objective.corruption.cache = torch.zeros(3)  # a tensor no checkpoint holds
    assert ["corruption StateDependentMasking holds cache"] == [p.split(" outside")[0] for p in outside_state(built)]


def test_learned_masking_weights_travel_with_the_export(trained_pair, tmp_path, monkeypatch):
    """A state-dependent corruption's learned w_v change the NELBO: the export's figures are the run's
    only if they were exported and loaded back."""
    from toydata import toy_recipe

    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))
    recipe = toy_recipe(tmp_path / "sd.toml", trained_pair["corpus"], tmp_path / "runs",
                        extra='[corruption]\nname = "state-dependent"\nweights = "learned"\n')
    assert tdlm_cli("run", recipe, "--set", "training.max_steps=4", "--set", "training.lr=0.3").exit_code == 0
    run = tmp_path / "runs" / "sd"  # run.name: the recipe file's
    assert tdlm_cli("export", run, tmp_path / "sd").exit_code == 0
    learned = loaded(tmp_path / "sd").built.model.objective.corruption.token_weights()
    assert not torch.allclose(learned, torch.ones_like(learned))  # trained away from the start
    assert torch.equal(learned, loaded(run).built.model.objective.corruption.token_weights())
    figures = [json.loads(tdlm_cli("eval", f, "--json", "--device", "cpu").stdout) for f in (run, tmp_path / "sd")]
    assert figures[0]["nll_per_token"] == figures[1]["nll_per_token"]


def test_a_shifted_run_exports_and_reads_back_as_the_run(trained_pair, tmp_path, monkeypatch):
    """model.shift_logits (a denoiser started from an AR model): tdlm export writes it, transformers
    gives the network's logits and tdlm eval of the folder the run's figures. (The toy BPE's
    end-of-text id is 0; that the BOS slot reads bos_id and no other id is checked with id 7 in
    test_transformers_gives_tdlm_s_logits_for_every_model_option.)"""
    import tdlm.hf
    from toydata import toy_recipe
    from transformers import AutoModelForMaskedLM

    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))
    recipe = toy_recipe(tmp_path / "shifted.toml", trained_pair["corpus"], tmp_path / "runs")
    assert tdlm_cli("run", recipe, "--set", "training.max_steps=2", "--set", "model.shift_logits=true").exit_code == 0
    run, folder = tmp_path / "runs" / "shifted", tmp_path / "shifted"
    result = tdlm_cli("export", run, folder, "--checkpoint", "last")
    assert result.exit_code == 0, result.output
    from tdlm.rundir import load_run

    net = load_run(run, which="last").built.model.net.eval()
    config = json.loads((folder / "config.json").read_text())
    assert config["shift_logits"] is True and config["bos_id"] == config["eot_id"] == net.bos_id
    tdlm.hf.register()
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    ids = torch.randint(0, net.vocab_size + 1, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, net(ids), atol=1e-5, rtol=0)
    figures = [json.loads(tdlm_cli("eval", f, "--checkpoint", "last", "--json", "--device", "cpu").stdout)
               for f in (run, folder)]
    assert figures[0]["nll_per_token"] == figures[1]["nll_per_token"]


# --- transformers -----------------------------------------------------------------------------

OPTIONS = [  # every value of every [model] option, both attentions
    ({"positions": "rope", "norm": "layernorm", "mlp": "gelu", "tied_embeddings": False}, "diffusion"),
    ({"positions": "learned", "norm": "rmsnorm", "mlp": "swiglu", "tied_embeddings": True, "bias": False}, "diffusion"),
    ({"positions": "rope", "norm": "rmsnorm", "mlp": "gelu", "tied_embeddings": True, "d_ff": 48}, "ar"),
    ({"positions": "learned", "norm": "layernorm", "mlp": "swiglu", "bias": False, "dropout": 0.1}, "ar"),
    # a denoiser started from an AR model: the BOS slot (bos_id = eot_id), RoPE over N + 1 slots
    ({"positions": "rope", "norm": "layernorm", "mlp": "swiglu", "tied_embeddings": True, "shift_logits": True},
     "diffusion"),
]


@pytest.mark.parametrize("options, objective", OPTIONS)
def test_transformers_gives_tdlm_s_logits_for_every_model_option(build, tmp_path, options, objective):
    import tdlm.hf
    from tdlm.export.write import write_network
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    tdlm.hf.register()
    built = build(vocab_size=V, seq_len=N, bos_id=7, model={"n_layers": 2, "d_model": 32, "n_heads": 4, **options},
                  objective=objective)
    torch.manual_seed(0)
    with torch.no_grad():  # weights far from their init, so that a wrong operation shows in the logits
        for param in built.model.parameters():
            param.normal_(0.0, 0.3)
    net, causal = built.model.net.eval(), objective == "ar"
    eot = 7  # the end-of-text id, the BOS slot's token with shift_logits (not 0, a default's value)
    assert net.bos_id == (eot if options.get("shift_logits") else None)
    write_network(tmp_path, net.cfg, built.model.state_dict(), vocab_size=V, mask_id=V, eot_id=eot, seq_len=N,
                  causal=causal, objective=objective)
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = auto.from_pretrained(tmp_path).eval()  # registered: no remote code
    assert type(model).__module__ == "tdlm.hf.modeling_tdlm"
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["shift_logits"], config["bos_id"]) == ((True, eot) if net.bos_id is not None else (False, None))
    for length in (N, 9):
        ids = torch.randint(0, V if causal else V + 1, (3, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ours, theirs = net(ids), model(ids).logits
        assert theirs.shape == (3, length, V)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_the_model_options_are_those_the_exported_code_implements():
    import inspect

    from tdlm.export.write import MODEL_OPTIONS
    from tdlm.hf.configuration_tdlm import TdlmConfig
    from tdlm.model import ModelConfig

    assert set(MODEL_OPTIONS) == set(ModelConfig.model_fields)
    assert set(MODEL_OPTIONS) <= set(inspect.signature(TdlmConfig.__init__).parameters)


def test_the_gpt2_tokenizer_exports_with_its_ids_and_the_mask(tmp_path, gpt2_files):
    from transformers import PreTrainedTokenizerFast

    from tdlm.data import DataConfig, load_vocab
    from tdlm.export.tokenizer import tokenizer_files

    vocab = load_vocab(DataConfig(tokenizer="gpt2"))
    for name, text in tokenizer_files(vocab, 128).items():
        (tmp_path / name).write_text(text)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "The game's 2nd half: résumé<|endoftext|> Ω naïve  spaces\n"
    assert hf(text).input_ids == vocab.encode(text)
    assert hf.convert_tokens_to_ids("<mask>") == vocab.mask_id == 50257
    assert hf("a <mask> b").input_ids == vocab.encode("a ") + [vocab.mask_id] + vocab.encode(" b")
    assert hf.decode(vocab.encode(text)) == vocab.decode(vocab.encode(text))


# the consumer's side: a Python where `import tdlm` fails
WITHOUT_TDLM = r"""
import importlib.abc, json, sys

class NoTdlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tdlm" or name.startswith("tdlm."):
            raise ImportError("tdlm is not installed here")

sys.meta_path.insert(0, NoTdlm())
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast

job = json.loads(sys.argv[1])
out = {}
for name, folder in job["folders"].items():
    auto = AutoModelForCausalLM if name == "ar" else AutoModelForMaskedLM
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out[name] = model(torch.tensor(job["ids"][name])).logits
    fast = PreTrainedTokenizerFast(tokenizer_file=folder + "/tokenizer.json")
    auto_tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    out[name + "-tokens"] = [fast(job["text"]).input_ids, auto_tok(job["text"]).input_ids,
                             auto_tok.mask_token_id, auto_tok.eos_token_id]
try:
    import tdlm
    out["tdlm"] = "importable"
except ImportError:
    out["tdlm"] = "blocked"
out["modules"] = sorted(m for m in sys.modules if m == "tdlm" or m.startswith("tdlm."))
torch.save(out, job["out"])
"""


def test_without_tdlm_transformers_loads_the_folder_and_gives_tdlm_s_logits(exported, pair_cache, tmp_path):
    text = "the cat likes the ball .\n"
    runs = {name: loaded(exported[name]) for name in ("diffusion", "ar")}
    vocab = runs["diffusion"].corpus.vocab
    encoded = vocab.encode(text)
    ids = {"diffusion": [encoded[:4] + [vocab.mask_id] * 3 + encoded[7:], encoded],
           "ar": [[vocab.bos_id] + encoded[:-1]] * 2}
    job = {"folders": {name: str(exported[f"export-{name}"]) for name in ids}, "ids": ids, "text": text,
           "out": str(tmp_path / "out.pt")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", WITHOUT_TDLM, json.dumps(job)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["tdlm"] == "blocked" and out["modules"] == []
    for name, run in runs.items():
        with torch.no_grad():
            ours = run.built.model.net(torch.tensor(ids[name]))
        torch.testing.assert_close(out[name], ours, atol=1e-5, rtol=0)
        assert out[f"{name}-tokens"] == [encoded, encoded, vocab.mask_id, vocab.bos_id]


def test_registered_classes_load_without_remote_code(exported, pair_cache):
    import tdlm.hf
    from transformers import AutoConfig, AutoModelForCausalLM

    tdlm.hf.register()
    tdlm.hf.register()  # twice: nothing more
    model = AutoModelForCausalLM.from_pretrained(exported["export-ar"]).eval()
    assert type(model).__module__ == "tdlm.hf.modeling_tdlm"
    # generate() without a cache: greedy decoding is tdlm's network's argmax chain
    ids = torch.tensor([[0, 5, 9]])
    made = model.generate(ids, max_new_tokens=3, do_sample=False)
    net = loaded(exported["ar"]).built.model.net
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, net(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(made, ids)
    assert type(AutoConfig.from_pretrained(exported["export-diffusion"])).__module__ == "tdlm.hf.configuration_tdlm"


def test_push_offline_is_one_line_and_keeps_the_folder(exported, tmp_path):
    bad = tdlm_cli("export", exported["ar"], tmp_path / "never", "--push", "not a repo")
    assert bad.exit_code == 2 and "OWNER/NAME" in bad.output and not (tmp_path / "never").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_not_a_token",
           "TDLM_CACHE_DIR": str(exported["cache"]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "tdlm", "export", str(exported["ar"]), str(tmp_path / "pushed"),
                           "--push", "me/tiny-ar"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tdlm: error: wrote") and "pushing it to me/tiny-ar failed" in line
    assert (tmp_path / "pushed" / "model.safetensors").is_file()


def test_exported_weights_that_do_not_fit_their_recipe_are_refused_in_one_line(exported, pair_cache, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "edited"
    shutil.copytree(exported["export-diffusion"], folder)
    weights = load_file(folder / "model.safetensors")
    weights["net.ln_f.weight"] = weights["net.ln_f.weight"][:-1].clone()  # another width
    save_file(weights, folder / "model.safetensors")
    result = tdlm_cli("eval", folder)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert f"{folder / 'model.safetensors'} does not fit the model its recipe builds" in result.output
    assert "other shape: net.ln_f.weight" in result.output and "export the run again" in result.output
