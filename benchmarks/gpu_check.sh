#!/usr/bin/env bash
# One-GPU check of tdlm, in one go (estimated 8-9 minutes on an H200 once the machine is up; not yet
# timed there), in order of importance so that a run cut short still returns the first figures:
#   bench_*      engine vs the plain full-logits loop, tiny diffusion and AR (tokens/s, MFU, ratio)
#   sync_check   the train step under torch.cuda.set_sync_debug_mode("error") (pytest, GPU-only tests)
#   tiny_*       the seed's tiny diffusion/AR pair trained to the end by `tdlm run`, each command timed
#                (summary.json: timing.startup_s apart from training, evals and the final scoring)
#   small_*      200 steps of the ~25M-parameter recipe eager and compiled (tokens/s, MFU)
#   dist_*       200 tiny steps each: plain, DeepSpeed ZeRO-2, ZeRO-3 (one process) and FSDP2, each
#                scored by `tdlm eval`, with a loss-curve plot of the three against the plain run
#   sweep_jobs   a 4-run tiny sweep with `tdlm sweep --jobs 4` sharing the GPU
# Every step logs under $OUT/logs and a failing step does not stop the next. $OUT gets small files
# only (JSON, CSV, PNG, logs; results.tar.gz holds the runs without weights or optimizer state).
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh            # on a machine with a GPU and tdlm installed
#   ONLY="bench dist" OUT=gpu_out bash benchmarks/gpu_check.sh   # some steps only (by prefix)
#   ONLY="small_bench kernel early sampler" OUT=gpu_out bash ...   # the optional steps: `tdlm bench --compile`
#       on the small recipe (engine vs plain, MFU), benchmarks/head_check.py, the seed's early-step scores, samplers
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_check.sh # the same logic on a CPU, a few tiny steps each
#
# On a machine without network: put wheels of what is missing in .whl/ (see docs/performance.md, "GPU notes (H200)") and
# the data in $TDLM_DATA_DIR; the script installs the wheels and tdlm itself without an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
RUNS=${RUNS:-/tmp/tdlm-gpu-runs}
mkdir -p "$OUT/logs" "$RUNS"
OUT=$(cd "$OUT" && pwd) RUNS=$(cd "$RUNS" && pwd)
export PYTHONUNBUFFERED=1 TDLM_CACHE_DIR=${TDLM_CACHE_DIR:-/tmp/tdlm-cache}

if [ -d .whl ] && ! python3 -c "import pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v tdlm >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi

NOLOG=(--set logging.progress=false)
if [ "${SMOKE:-0}" = 1 ]; then  # the script's logic on a CPU: every step, a handful of tiny steps
    DEVICE=cpu EVAL=(--t-samples 1)  # a CPU scores a GPT-2-sized head slowly: one t per test sequence
    NOLOG+=(--set eval.sample_num=0)
    TINY=(--set training.max_steps=3 --set training.eval_every=3 --set training.eval_sequences=4
          --set eval.final_splits=[] --set model.d_model=16 --set model.d_ff=32)
    SMALL=(--set training.eval_every=100 --set model.n_layers=1 --set model.d_model=32 --set model.n_heads=2)
    DIST=(--set training.eval_sequences=4 --set model.d_model=16 --set model.d_ff=32)
    SMALL_STEPS=2 DIST_STEPS=4 SWEEP_STEPS=2 JOBS=2 COMPILE=false
    BENCH=(--steps 1 --warmup 0 --repeats 1) SMALL_BENCH=(--steps 1 --warmup 0 --repeats 1 --batch 4 --d-model 32
          --n-layers 1 --n-heads 2 --vocab 512)
    DS2=(--config_file launch/cpu_deepspeed_zero2.yaml) DS3=(--config_file launch/cpu_deepspeed_zero3.yaml)
    FSDP=(--config_file launch/cpu_fsdp.yaml)
    DRAFT=(--set training.max_steps=2) QUALITY=(--num 2 --steps 4 --samplers ancestral,threshold,speculative)
else
    DEVICE=cuda EVAL=() TINY=() DIST=() SMALL=(--set training.eval_every=100000)
    SMALL_STEPS=200 DIST_STEPS=200 SWEEP_STEPS=200 JOBS=4 COMPILE=true
    BENCH=(--steps 20 --warmup 5 --repeats 3) SMALL_BENCH=(--recipe recipes/small_wikitext2.toml --steps 10 --warmup 3 --repeats 2)
    DS2=(--config_file launch/deepspeed_zero2.yaml --num_processes 1)
    DS3=(--config_file launch/deepspeed_zero3.yaml --num_processes 1)
    FSDP=(--config_file launch/fsdp.yaml --num_processes 1)
    DRAFT=() QUALITY=(--num 64 --steps 128,32,8)
fi

pack() {  # what came so far, so that a run cut off by a time limit still returns it
    tar -czf "$OUT/results.tar.gz" -C "$OUT" logs -C "$RUNS" \
        --exclude='*.safetensors' --exclude='state.pt' --exclude='engine' --exclude='*.distcp' . 2>/dev/null
}
OPTIONAL="small_bench kernel early sampler"  # run only when ONLY names them
wanted() {  # is step NAME among $ONLY (prefixes; every step but the optional ones when ONLY is unset)?
    local prefix
    if [ -z "${ONLY:-}" ]; then
        for prefix in $OPTIONAL; do [[ $1 == "$prefix"* ]] && return 1; done
        return 0
    fi
    for prefix in $ONLY; do [[ $1 == "$prefix"* ]] && return 0; done
    return 1
}
step() {  # step NAME COMMAND...: run it, log it, time it (logs/steps.txt, logs/steps.csv)
    local name=$1; shift
    wanted "$name" || return 0
    echo "== $name: $*" | tee -a "$OUT/logs/steps.txt"
    local start=$SECONDS
    "$@" >"$OUT/logs/$name.log" 2>&1
    local rc=$?
    echo "   $name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/logs/steps.txt"
    echo "$name,$rc,$((SECONDS - start))" >>"$OUT/logs/steps.csv"
    pack
}
keep() {  # keep NAME FILE: a run's small result file under $OUT/summaries
    [ -f "$2" ] && mkdir -p "$OUT/summaries" && cp "$2" "$OUT/summaries/$1"
}

{ nvidia-smi 2>&1 || true; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; pip list 2>/dev/null | grep -i -E "^(torch|deepspeed|accelerate|liger|pydantic|triton) "; } >"$OUT/logs/environment.txt" 2>&1
echo "step,exit,seconds" >"$OUT/logs/steps.csv"

# -- engine vs the plain loop, and the step's host syncs -----------------------------------------
for recipe in recipes/tiny_wikitext2.toml recipes/tiny_wikitext2_ar.toml; do
    name=$(basename "$recipe" .toml)
    what=(--recipe "$recipe")  # on a CPU, the same command at a size that takes seconds
    objective=diffusion; [[ $name == *_ar ]] && objective=ar
    [ "${SMOKE:-0}" = 1 ] && what=(--objective $objective --vocab 512 --batch 4 --d-model 16 --n-layers 1 --n-heads 2)
    step "bench_${name}" tdlm bench --device "$DEVICE" "${what[@]}" "${BENCH[@]}" --json
    cp "$OUT/logs/bench_${name}.log" "$OUT/bench_${name}.json" 2>/dev/null
done
[ "$DEVICE" = cuda ] && step sync_check python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k "does_not_synchronize"

# -- the tiny pair end to end, each command timed ------------------------------------------------
for objective in diffusion ar; do
    recipe=recipes/tiny_wikitext2.toml; [ $objective = ar ] && recipe=recipes/tiny_wikitext2_ar.toml
    name=$(basename "$recipe" .toml)
    step "tiny_$objective" tdlm run "$recipe" --set run.out_dir="$RUNS" "${NOLOG[@]}" "${TINY[@]}"
    keep "$name.summary.json" "$RUNS/$name/summary.json"
done

# -- the small recipe: eager and compiled ---------------------------------------------------------
step small_eager tdlm run recipes/small_wikitext2.toml --stop-at "$SMALL_STEPS" --set run.out_dir="$RUNS" \
    --set run.name=small_eager "${NOLOG[@]}" "${SMALL[@]}"
keep small_eager.summary.json "$RUNS/small_eager/summary.json"
step small_compiled tdlm run recipes/small_wikitext2.toml --stop-at "$SMALL_STEPS" --set run.out_dir="$RUNS" \
    --set run.name=small_compiled --set training.compile=$COMPILE "${NOLOG[@]}" "${SMALL[@]}"
keep small_compiled.summary.json "$RUNS/small_compiled/summary.json"
compile=(--compile); [ "$COMPILE" = false ] && compile=()
step small_bench tdlm bench --device "$DEVICE" "${SMALL_BENCH[@]}" "${compile[@]}" --json
cp "$OUT/logs/small_bench.log" "$OUT/bench_small_compiled.json" 2>/dev/null

# -- distributed engines, 200 tiny steps each, against the plain run -----------------------------
DIST_SET=(--set run.out_dir="$RUNS" --set training.max_steps=$DIST_STEPS --set training.eval_every=$DIST_STEPS
          --set training.log_every=10 --set eval.final_splits=[] "${NOLOG[@]}" "${DIST[@]}")
[ "${SMOKE:-0}" = 1 ] && DIST_SET+=(--set training.log_every=1)
step dist_plain tdlm run recipes/tiny_wikitext2.toml --set run.name=plain_$DIST_STEPS "${DIST_SET[@]}"
step dist_zero2 accelerate launch "${DS2[@]}" -m tdlm run recipes/tiny_wikitext2.toml --set run.name=zero2_$DIST_STEPS "${DIST_SET[@]}"
step dist_zero3 accelerate launch "${DS3[@]}" -m tdlm run recipes/tiny_wikitext2.toml --set run.name=zero3_$DIST_STEPS "${DIST_SET[@]}"
step dist_fsdp accelerate launch "${FSDP[@]}" -m tdlm run recipes/tiny_wikitext2.toml --set run.name=fsdp_$DIST_STEPS "${DIST_SET[@]}"
for run in plain zero2 zero3 fsdp; do
    step "dist_${run}_eval" tdlm eval "$RUNS/${run}_$DIST_STEPS" --split test --device "$DEVICE" "${EVAL[@]}" --json
    cp "$OUT/logs/dist_${run}_eval.log" "$OUT/logs/${run}_${DIST_STEPS}_eval.log" 2>/dev/null
done
step dist_curves python3 benchmarks/loss_curves.py "$RUNS/plain_$DIST_STEPS" "$RUNS/zero2_$DIST_STEPS" \
    "$RUNS/zero3_$DIST_STEPS" "$RUNS/fsdp_$DIST_STEPS" --evals "$OUT/logs" --out "$OUT/dist_loss_curves"

# -- a sweep of tiny runs sharing the device ------------------------------------------------------
if wanted sweep_jobs; then
    smoke_fixed=""
    [ "${SMOKE:-0}" = 1 ] && smoke_fixed=$'"training.eval_sequences" = 4\n"model.d_model" = 16\n"model.d_ff" = 32\n"eval.sample_num" = 0'
    cat >"$RUNS/gpu_sweep.toml" <<EOF
[sweep]
name = "sweep_jobs"
base = "$PWD/recipes/tiny_wikitext2.toml"
out_dir = "$RUNS"

[fixed]
"training.max_steps" = $SWEEP_STEPS
"training.eval_every" = $SWEEP_STEPS
"eval.final_splits" = []
"logging.progress" = false
$smoke_fixed

[grid]
"training.lr" = [3e-4, 1e-3, 3e-3, 1e-2]
EOF
fi
step sweep_jobs tdlm sweep "$RUNS/gpu_sweep.toml" --jobs $JOBS
python3 - "$RUNS/sweep_jobs" "$OUT/sweep_jobs.json" <<'EOF' 2>/dev/null
import json, sys
from pathlib import Path
runs = {p.parent.name: json.loads(p.read_text()) for p in Path(sys.argv[1]).glob("*/summary.json")}
keys = ("status", "step", "train_tokens_per_s", "train_seconds", "wall_time_s", "timing")
Path(sys.argv[2]).write_text(json.dumps({n: {k: s.get(k) for k in keys} for n, s in runs.items()}, indent=2))
EOF

step kernel_check python3 benchmarks/head_check.py --device "$DEVICE"  # optional: measured on an H200 before

# -- optional (ONLY="early sampler"): the seed's early-step comparison and the samplers ------------
for recipe in recipes/tiny_wikitext2.toml recipes/tiny_wikitext2_ar.toml; do
    name=early_$(basename "$recipe" .toml)
    for stop in 2 10 20; do
        resume=(); [ "$stop" != 2 ] && resume=(--resume)
        step "${name}_$stop" tdlm run "$recipe" "${resume[@]}" --stop-at $stop --set run.out_dir="$RUNS" \
            --set run.name="$name" "${NOLOG[@]}" "${TINY[@]}" --set training.max_steps=1490 --set eval.final_splits=[]
        step "${name}_${stop}_test" tdlm eval "$RUNS/$name" --checkpoint last --split test --device "$DEVICE" --json
    done
done
if wanted sampler; then
    step sampler_draft tdlm run recipes/tiny_wikitext2.toml --set run.out_dir="$RUNS" --set run.name=tiny_draft \
        --set model.n_layers=1 --set model.d_model=32 --set model.n_heads=2 --set model.tied_embeddings=true \
        --set training.max_steps=600 --set training.lr=1e-3 --set eval.final_splits=[] "${NOLOG[@]}" "${TINY[@]}" "${DRAFT[@]}"
    step sampler_quality python3 benchmarks/sampler_quality.py "$RUNS/tiny_wikitext2" --reference "$RUNS/tiny_wikitext2_ar" \
        --draft "$RUNS/tiny_draft" --device "$DEVICE" --figures "${QUALITY[@]}"
fi
echo "done" | tee -a "$OUT/logs/steps.txt"
pack
