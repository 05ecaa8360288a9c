"""Several processes on one CPU (DDP over gloo): the recipe, not the process count, fixes the run.

Workers are started the way torchrun starts them (RANK / WORLD_SIZE / MASTER_* in the
environment), directly, so that a test can signal one rank alone, or by `accelerate launch` with
the documented configs. One-process commands run in this process (`here`): a launch costs seconds
of imports and proves nothing a plain `tdlm` command does not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from toydata import toy_recipe

from tdlm.cli import cli
from tdlm.training.monitor import read_metrics

STEPS = 8
# One process with two micro-batches of 4 and two processes with one micro-batch of 4 do the same
# arithmetic up to the order of float additions in the gradient average: the curves agree to
# float32 rounding, amplified a little by Adam over a few steps.
LOSS_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "TDLM_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, world_size: int = 2) -> list[subprocess.Popen]:
    """`tdlm ARGS` in `world_size` worker processes."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        worker_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                      "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "tdlm", *args], env=worker_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait(procs, timeout: float = 240) -> list[str]:
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    finally:  # a hung rank (e.g. waiting in a collective the others never join) must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def run(args, env, world_size: int = 2) -> list[str]:
    return wait(start(args, env, world_size))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerate_launch(config: str, args, env) -> str:
    """`accelerate launch --config_file launch/CONFIG -m tdlm ARGS`, as docs/scaling.md says."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "launch", config), "-m", "tdlm", *args]
    proc = subprocess.run(command, env={k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def here(args, env, exit_code: int = 0) -> str:
    """`tdlm ARGS` as one process, in this one (one thread, as the workers), with their environment."""
    result = CliRunner().invoke(cli, list(map(str, args)), env={k: v for k, v in env.items()
                                                                  if k.startswith(("TDLM_", "DS_"))})
    assert result.exit_code == exit_code, result.output[-3000:]
    return result.output


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("dist")
    return toy_recipe(folder / "toy.toml", corpus, folder / "runs")


COMMON = ("--set", f"training.max_steps={STEPS}", "--set", "training.micro_batch_size=4",
          "--set", "training.log_every=1", "--set", "training.eval_every=4", "--set", 'eval.final_splits=["test"]')


@pytest.fixture(scope="module")
def one_process_run(recipe, env):
    here(["run", recipe, *COMMON, "--set", "run.name=one"], env)
    return recipe.parent / "runs" / "one"


def test_two_processes_launched_as_documented_follow_the_one_process_loss_curve_and_eval(
        recipe, env, one_process_run):
    out = accelerate_launch("cpu_2proc.yaml", ["run", str(recipe), *COMMON, "--set", "run.name=two"], env)
    assert "2 process(es) (ddp)" in out
    two = recipe.parent / "runs" / "two"
    one_losses, two_losses = train_losses(one_process_run), train_losses(two)
    assert sorted(one_losses) == sorted(two_losses) == list(range(1, STEPS + 1))
    for step in one_losses:
        assert two_losses[step] == pytest.approx(one_losses[step], abs=LOSS_TOLERANCE), step
    one_summary = json.loads((one_process_run / "summary.json").read_text())
    two_summary = json.loads((two / "summary.json").read_text())
    assert two_summary["processes"] == 2 and one_summary["processes"] == 1
    # sharded eval: every token scored exactly once, and the same figure
    assert two_summary["test"]["tokens"] == one_summary["test"]["tokens"]
    assert two_summary["test"]["sequences"] == one_summary["test"]["sequences"]
    assert two_summary["test"]["bytes"] == one_summary["test"]["bytes"]
    assert two_summary["test"]["nll_per_token"] == pytest.approx(one_summary["test"]["nll_per_token"], abs=1e-3)
    one_val = [r for r in read_metrics(one_process_run, "val")]
    two_val = [r for r in read_metrics(two, "val")]
    assert [r["step"] for r in two_val] == [r["step"] for r in one_val]
    for a, b in zip(one_val, two_val):
        assert b["nll_per_token"] == pytest.approx(a["nll_per_token"], abs=1e-3)
    # only rank 0 wrote the run's files: one record per step, not two
    assert len(read_metrics(two, "train")) == STEPS


def test_a_checkpoint_of_two_processes_resumes_on_one(recipe, env, one_process_run):
    args = ["run", str(recipe), *COMMON, "--set", "run.name=two-to-one"]
    run([*args, "--stop-at", "4"], env)
    here([*args, "--resume"], env)
    resumed = train_losses(recipe.parent / "runs" / "two-to-one")
    reference = train_losses(one_process_run)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=LOSS_TOLERANCE), step


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(recipe, env):
    run_dir = recipe.parent / "runs" / "preempted"
    args = ["run", str(recipe), "--set", "training.max_steps=100000", "--set", "training.log_every=1",
            "--set", "training.eval_every=100000", "--set", "run.name=preempted"]
    procs = start(args, env)
    deadline = time.time() + 180
    while not any(r["step"] >= 2 for r in read_metrics(run_dir, "train")):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice that reached one rank only
    outputs = wait(procs, timeout=120)
    assert "SIGTERM received" in outputs[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped"
    last = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert last["step"] == summary["step"] < 100000
    # and the run continues from there
    here([*args, "--resume", "--stop-at", str(summary["step"] + 2)], env)
    assert max(train_losses(run_dir)) == summary["step"] + 2


def test_training_from_webdataset_shards_on_one_and_two_processes(tmp_path, corpus, env):
    here(["data", "prepare", corpus, "--out", tmp_path / "shards", "--seq-len", "32",
          "--shard-size", "16", "--tokenizer", "bpe", "--bpe-vocab-size", "300"], env)
    recipe = toy_recipe(tmp_path / "toy.toml", corpus, tmp_path / "runs")
    text = recipe.read_text()
    data_section = text[text.index("[data]"): text.index("[model]")]
    recipe.write_text(text.replace(data_section, f'[data]\nformat = "webdataset"\npath = "{tmp_path / "shards"}"\n'
                                                 'seq_len = 32\n\n'))
    here(["run", recipe, *COMMON, "--set", "run.name=one"], env)
    run(["run", str(recipe), *COMMON, "--set", "run.name=two"], env)
    one, two = train_losses(tmp_path / "runs" / "one"), train_losses(tmp_path / "runs" / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=LOSS_TOLERANCE), step
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test"]["tokens"] > 0


@pytest.fixture(scope="module")
def deepspeed_env(env):
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev and deepspeed extras")
    return {**env, "DS_ACCELERATOR": "cpu"}


def test_deepspeed_zero2_follows_the_one_process_curve_and_its_weights_load_in_plain_eval(
        recipe, deepspeed_env, one_process_run):
    out = accelerate_launch("cpu_deepspeed_zero2.yaml", ["run", str(recipe), *COMMON, "--set", "run.name=zero2"],
                            deepspeed_env)
    assert "2 process(es) (deepspeed-zero2)" in out
    run_dir = recipe.parent / "runs" / "zero2"
    zero2 = train_losses(run_dir)
    for step, loss in train_losses(one_process_run).items():
        assert zero2[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    summary = json.loads((run_dir / "summary.json").read_text())
    plain = here(["eval", run_dir, "--split", "test", "--json", "--device", "cpu"], deepspeed_env)
    plain = json.loads(plain[plain.index("{"):])
    assert plain["tokens"] == summary["test"]["tokens"]
    assert plain["nll_per_token"] == pytest.approx(summary["test"]["nll_per_token"], abs=1e-6)


def test_deepspeed_zero3_stops_and_resumes_exactly_and_refuses_another_process_count(
        recipe, deepspeed_env, one_process_run):
    args = ["run", str(recipe), *COMMON, "--set", "run.name=zero3"]
    accelerate_launch("cpu_deepspeed_zero3.yaml", [*args, "--stop-at", "4"], deepspeed_env)
    # its optimizer state is sharded over 2 processes: resuming on 1 is refused, nothing is lost
    out = here([*args, "--resume"], deepspeed_env, exit_code=2)
    assert "same engine and process count" in out, out[-2000:]
    accelerate_launch("cpu_deepspeed_zero3.yaml", [*args, "--resume"], deepspeed_env)
    zero3 = train_losses(recipe.parent / "runs" / "zero3")
    for step, loss in train_losses(one_process_run).items():
        assert zero3[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    sample = here(["sample", recipe.parent / "runs" / "zero3", "--num", "1", "--length", "8", "--json"],
                  deepspeed_env)
    assert json.loads(sample[sample.index("{"):])["nfe"] > 0


def test_fsdp2_follows_the_one_process_curve_resumes_and_its_weights_load_in_plain_eval(
        recipe, env, one_process_run):
    """launch/cpu_fsdp.yaml: FSDP2 (fully_shard per Block, sharded optimizer state) on 2 gloo
    processes. Stopped at step 4 and resumed, it follows the 1-process curve; the gathered full
    weights of its checkpoint score in a plain one-process `tdlm eval` as in its own summary."""
    args = ["run", str(recipe), *COMMON, "--set", "run.name=fsdp"]
    out = accelerate_launch("cpu_fsdp.yaml", [*args, "--stop-at", "4"], env)
    assert "2 process(es) (fsdp2)" in out
    run_dir = recipe.parent / "runs" / "fsdp"
    assert (run_dir / "checkpoints" / "step-0000004" / "engine").is_dir()  # FSDP's own sharded state
    accelerate_launch("cpu_fsdp.yaml", [*args, "--resume"], env)
    fsdp = train_losses(run_dir)
    for step, loss in train_losses(one_process_run).items():
        assert fsdp[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["engine"] == "fsdp2"
    plain = here(["eval", run_dir, "--split", "test", "--json", "--device", "cpu"], env)
    plain = json.loads(plain[plain.index("{"):])
    assert plain["tokens"] == summary["test"]["tokens"]
    assert plain["nll_per_token"] == pytest.approx(summary["test"]["nll_per_token"], abs=1e-6)
    one = json.loads((one_process_run / "summary.json").read_text())
    assert summary["test"]["nll_per_token"] == pytest.approx(one["test"]["nll_per_token"], abs=1e-3)
