# Shared body of the Franca sbatch scripts (sourced by them after `CONFIG=<shipped config name>`).
#
# Environment (nothing user-specific is hard-coded):
#   FRANCA_OUTPUT_DIR  required: checkpoints, logs, metrics (on a file system every node sees)
#   FRANCA_ROOT        the repository checkout (default: the directory sbatch was called from)
#   FRANCA_PYTHON      the Python interpreter of the environment (default: python on PATH)
#   FRANCA_DATASET     optional dataset string, e.g. ImageNet22k:root=/data/in21k:extra=/data/in21k-extra
# Extra arguments of `sbatch script.sbatch key=value ...` are config overrides.
#
# Every task runs `python -m franca.train.train`; franca.distributed reads the SLURM variables (rank,
# world size, first node as master, port derived from the job id). A run resumes from the newest
# checkpoint of FRANCA_OUTPUT_DIR, so the job saves and requeues itself when SLURM signals the end of its time.
set -euo pipefail

: "${CONFIG:?the sbatch script must set CONFIG before sourcing common.sh}"
: "${FRANCA_OUTPUT_DIR:?set FRANCA_OUTPUT_DIR to the output directory of the run}"
FRANCA_ROOT=${FRANCA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${FRANCA_PYTHON:-python}

overrides=("$@")
if [[ -n "${FRANCA_DATASET:-}" ]]; then
    overrides+=("train.dataset_path=${FRANCA_DATASET}")
fi

cd "$FRANCA_ROOT"
export PYTHONPATH="$FRANCA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$FRANCA_OUTPUT_DIR"

# SIGUSR1 comes to this batch shell 300 s before the time limit (#SBATCH --signal=B:USR1@300). It is
# passed on to the training tasks (scancel signals the job's steps, not the batch shell), which finish
# their iteration, write a checkpoint and exit (status 3); only then is the job requeued (a requeue kills
# the running tasks), and the new job resumes from that checkpoint.
requeue=0
on_usr1() {
    echo "franca: time limit near: the tasks checkpoint, then job ${SLURM_JOB_ID:-?} is requeued"
    requeue=1
    scancel --signal=USR1 "${SLURM_JOB_ID}"
}
trap on_usr1 USR1

srun --kill-on-bad-exit=1 "$PYTHON" -m franca.train.train \
    --config-file "$CONFIG" --output-dir "$FRANCA_OUTPUT_DIR" "${overrides[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
# a trapped signal interrupts `wait`; keep waiting until srun itself has ended
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" && status=0 || status=$?
done
if [[ "$requeue" == 1 ]]; then
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
