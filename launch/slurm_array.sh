#!/bin/bash
# One tdlm sweep as a SLURM job array: array task i trains the run on line i+1 of the commands
# file (the run directory, a tab, then the arguments of `tdlm run`, shell-quoted).
# `tdlm sweep SWEEP.toml --emit slurm [--gpus N] [--time HH:MM:SS]` fills in the @@...@@ fields
# of this template and writes the script next to its commands file; then: sbatch that script.
#
# Requeue-safe: a task whose run has finished exits at once, and one whose run holds a
# checkpoint continues it with --resume; a run that died before its first checkpoint is moved
# to .aborted/ beside it and starts again.
#
# Time limits: --signal=B:TERM@120 sends SIGTERM to this script 120 s before the limit. It is
# passed on to the run once; tdlm finishes the current step, writes a checkpoint and exits,
# and the task requeues itself to go on. With several GPUs, accelerate's launcher (torchrun)
# passes the signal to every process and waits 30 s before killing them; with one GPU the run
# is started without a launcher, because accelerate's single-process launcher does not pass
# SIGTERM on. A preemption that signals every process at once can lose the steps since the
# last periodic checkpoint (training.checkpoint_every): the requeued task resumes from it.
#
#SBATCH --job-name=@@JOB_NAME@@
#SBATCH --array=0-@@LAST_INDEX@@
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=@@GPUS@@
#SBATCH --cpus-per-task=8
#SBATCH --time=@@TIME@@
#SBATCH --output=@@LOG_DIR@@/%x-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
##SBATCH --partition=FILL-IN     # and any account / QoS lines your cluster needs

set -uo pipefail
export PATH="@@BIN_DIR@@:$PATH"   # the Python environment tdlm was installed in
cd "@@WORKDIR@@"                  # run directories and recipe paths are relative to it
COMMANDS="@@COMMANDS@@"
LAUNCH_CONFIG="@@LAUNCH_CONFIG@@"

LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$COMMANDS")
RUN_DIR=${LINE%%$'\t'*}
eval "set -- ${LINE#*$'\t'}"

if grep -qs '"status": "finished"' "$RUN_DIR/summary.json"; then
  echo "$RUN_DIR has finished; nothing to do"
  exit 0
fi
RESUME=""
if [ -f "$RUN_DIR/checkpoints/last.json" ]; then
  RESUME="--resume"
elif [ -f "$RUN_DIR/config.json" ]; then
  ABORTED="$(dirname "$RUN_DIR")/.aborted"
  mkdir -p "$ABORTED" && mv "$RUN_DIR" "$ABORTED/$(basename "$RUN_DIR")-$(date +%s)"
fi

NPROC=${SLURM_GPUS_ON_NODE:-1}
if [ "$NPROC" -gt 1 ]; then
  accelerate launch --config_file "$LAUNCH_CONFIG" --num_processes "$NPROC" -m tdlm run "$@" $RESUME &
else
  python -m tdlm run "$@" $RESUME &
fi
CHILD=$!
STOPPING=0
trap 'STOPPING=1; kill -TERM "$CHILD" 2>/dev/null' TERM
wait "$CHILD"
STATUS=$?
while kill -0 "$CHILD" 2>/dev/null; do  # `wait` returns as soon as the trap has run
  wait "$CHILD"
  STATUS=$?
done
if [ "$STOPPING" = 1 ]; then
  echo "stopped with a checkpoint before the time limit; requeueing to continue"
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
exit "$STATUS"
