#!/usr/bin/env bash
# One run of a Slurm job array that `SLURM=1 bash run_all.sh` submits: line
# $SLURM_ARRAY_TASK_ID of LIST (NAME<TAB>COMMAND, the lines of LIST=1 bash run_all.sh with their
# names), its output appended to OUT/NAME/log.txt, OUT/NAME/.done touched when it succeeds.
#
#   sbatch --array=1-N%K --requeue [resources] slurm_job.sh LIST OUT
#
# Preemption, requeue, a time limit: Slurm sends SIGTERM to every process of the task. The
# run writes "interrupted after task k of n" to its log and exits 143; what it had saved
# (a checkpoint after every task) stays. A requeued or resubmitted task runs the same command,
# which resumes from that checkpoint; a run that is done is skipped.
set -u
list=$1 out=$2
line=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$list")
if [ -z "$line" ]; then
    echo "slurm_job.sh: $list has no line $SLURM_ARRAY_TASK_ID" >&2
    exit 1
fi
name=${line%%$'\t'*} cmd=${line#*$'\t'}
if [ -f "$out/$name/.done" ]; then
    echo "$name: done already"
    exit 0
fi
mkdir -p "$out/$name"
log=$out/$name/log.txt
echo "[$(date +%FT%T) job ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID on $(hostname)" \
    "(restart ${SLURM_RESTART_COUNT:-0})] $cmd" >> "$log"
bash -c "$cmd" >> "$log" 2>&1
code=$?
if [ $code = 0 ]; then
    touch "$out/$name/.done"
fi
exit $code
