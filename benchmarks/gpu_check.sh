#!/usr/bin/env bash
# One-GPU check of tdlm, in one go: the seed's tiny diffusion/AR pair trained to the end and
# scored after 2, 10 and 20 steps, the engine benchmark on CUDA (tdlm's head and Liger's fused
# kernel), DeepSpeed ZeRO-2 (one process) scored by `tdlm eval`, 200 steps of the ~25M-parameter
# recipe with and without torch.compile, and the samplers on the trained tiny model. Every step
# logs under $OUT and a failing step does not stop the next.
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh            # on a machine with a GPU and tdlm installed
#   ONLY="early deepspeed" OUT=gpu_out bash benchmarks/gpu_check.sh   # some steps only (by prefix)
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_check.sh # the same steps, a few tiny steps each (CPU)
#
# On a machine without network: put wheels of what is missing in .whl/ (see README, "GPU") and
# the data in $TDLM_DATA_DIR; the script installs the wheels and tdlm itself without an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
RUNS=${RUNS:-/tmp/tdlm-gpu-runs}
mkdir -p "$OUT/logs" "$RUNS"
export PYTHONUNBUFFERED=1 TDLM_CACHE_DIR=${TDLM_CACHE_DIR:-/tmp/tdlm-cache}

if [ -d .whl ] && ! python3 -c "import pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v tdlm >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi

if [ "${SMOKE:-0}" = 1 ]; then  # the script's logic on a CPU: every step, a handful of tiny steps
    DEVICE=cpu
    TRAIN=(--set training.max_steps=3 --set training.eval_every=3 --set training.eval_sequences=4
           --set eval.final_splits=[] --set model.d_model=16 --set model.d_ff=32)
    SHORT=(--set training.max_steps=2 --set training.eval_every=2 --set training.eval_sequences=4
           --set model.n_layers=1 --set model.d_model=32 --set model.n_heads=2)
    DS_STEPS=2 SMALL_STOP=2 BENCH=(--steps 1 --warmup 0 --repeats 1) DS_CONFIG=launch/cpu_deepspeed_zero2.yaml
    DRAFT=(--set training.max_steps=2) QUALITY=(--num 2 --steps 4 --samplers ancestral,threshold,speculative)
else
    DEVICE=cuda TRAIN=() SHORT=() DS_STEPS=50 SMALL_STOP=200 BENCH=(--steps 20 --warmup 5 --repeats 3)
    DS_CONFIG=launch/deepspeed_zero2.yaml DRAFT=() QUALITY=(--num 64 --steps 128,32,8)
fi

pack() {  # what came so far, so that a run cut off by a time limit still returns it
    tar -czf "$OUT/results.tar.gz" -C "$OUT" logs -C "$RUNS" \
        --exclude='*.safetensors' --exclude='state.pt' --exclude='engine' . 2>/dev/null
}
wanted() {  # is step NAME among $ONLY (prefixes; all steps when ONLY is unset)?
    [ -z "${ONLY:-}" ] && return 0
    local prefix
    for prefix in $ONLY; do [[ $1 == "$prefix"* ]] && return 0; done
    return 1
}
step() {  # step NAME COMMAND...: run it, log it, time it
    local name=$1; shift
    wanted "$name" || return 0
    echo "== $name: $*" | tee -a "$OUT/logs/steps.txt"
    local start=$SECONDS
    "$@" >"$OUT/logs/$name.log" 2>&1
    local rc=$?
    echo "   $name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/logs/steps.txt"
    pack
}

{ nvidia-smi 2>&1 || true; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; pip list 2>/dev/null | grep -i -E "^(torch|deepspeed|accelerate|liger|pydantic|triton) "; } >"$OUT/logs/environment.txt" 2>&1

step kernel_check python3 benchmarks/head_check.py --device "$DEVICE"
step tiny_diffusion tdlm run recipes/tiny_wikitext2.toml --set run.out_dir="$RUNS" --set logging.progress=false "${TRAIN[@]}"
step tiny_ar tdlm run recipes/tiny_wikitext2_ar.toml --set run.out_dir="$RUNS" --set logging.progress=false "${TRAIN[@]}"
# the best checkpoint's weights of both runs, in parts small enough to come back from a remote machine
[ -f "$RUNS/tiny_wikitext2_ar/checkpoints/best.json" ] && wanted tiny && {
best() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['dir'])" "$RUNS/$1/checkpoints/best.json"; }
(cd "$RUNS" && tar -cf - tiny_wikitext2/checkpoints/best.json "tiny_wikitext2/checkpoints/$(best tiny_wikitext2)/model.safetensors" \
    tiny_wikitext2_ar/checkpoints/best.json "tiny_wikitext2_ar/checkpoints/$(best tiny_wikitext2_ar)/model.safetensors" \
    | split -b 15M - "$OUT/weights.tar.part-"); }
# the seed compares the two after 2, 10 and 20 training steps: the same with valid figures
for recipe in recipes/tiny_wikitext2.toml recipes/tiny_wikitext2_ar.toml; do
    name=early_$(basename "$recipe" .toml)
    for stop in 2 10 20; do
        resume=(); [ "$stop" != 2 ] && resume=(--resume)
        step "${name}_$stop" tdlm run "$recipe" "${resume[@]}" --stop-at $stop --set run.out_dir="$RUNS" \
            --set run.name="$name" --set logging.progress=false "${TRAIN[@]}" --set training.max_steps=1490 \
            --set eval.final_splits=[]
        step "${name}_${stop}_test" tdlm eval "$RUNS/$name" --checkpoint last --split test --device "$DEVICE" --json
    done
done
for recipe in recipes/tiny_wikitext2.toml recipes/tiny_wikitext2_ar.toml; do
    name=$(basename "$recipe" .toml)
    step "bench_${name}" tdlm bench --device "$DEVICE" --recipe "$recipe" "${BENCH[@]}" --json
    step "bench_${name}_liger" tdlm bench --device "$DEVICE" --recipe "$recipe" "${BENCH[@]}" --fused --json
done
step deepspeed_zero2 accelerate launch --config_file "$DS_CONFIG" --num_processes 1 -m tdlm run recipes/tiny_wikitext2.toml \
    --set run.out_dir="$RUNS" --set run.name=ds_zero2 --set logging.progress=false "${TRAIN[@]}" \
    --set training.max_steps=$DS_STEPS --set training.eval_every=$DS_STEPS
step deepspeed_zero2_eval tdlm eval "$RUNS/ds_zero2" --split test --device "$DEVICE" --json
step small_eager tdlm run recipes/small_wikitext2.toml --stop-at "$SMALL_STOP" --set run.out_dir="$RUNS" \
    --set run.name=small_eager --set logging.progress=false "${SHORT[@]}"
step small_compiled tdlm run recipes/small_wikitext2.toml --stop-at "$SMALL_STOP" --set run.out_dir="$RUNS" \
    --set run.name=small_compiled --set training.compile=true --set logging.progress=false "${SHORT[@]}"
# samplers on the trained tiny model: NFE against quality, a 1-layer d=32 draft for speculative
step tiny_draft tdlm run recipes/tiny_wikitext2.toml --set run.out_dir="$RUNS" --set run.name=tiny_draft \
    --set model.n_layers=1 --set model.d_model=32 --set model.n_heads=2 --set model.tied_embeddings=true \
    --set training.max_steps=600 --set training.lr=1e-3 --set eval.final_splits=[] --set logging.progress=false "${TRAIN[@]}" "${DRAFT[@]}"
step sampler_quality python3 benchmarks/sampler_quality.py "$RUNS/tiny_wikitext2" --reference "$RUNS/tiny_wikitext2_ar" \
    --draft "$RUNS/tiny_draft" --device "$DEVICE" --figures "${QUALITY[@]}"
echo "done" | tee -a "$OUT/logs/steps.txt"
pack
