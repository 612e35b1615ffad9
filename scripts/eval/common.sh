# Shared body of the evaluation sbatch scripts, sourced by them: checks the settings, resolves the
# checkpoint and datasets, sets up the SLURM rendezvous, then `run_eval MODULE SUBDIR [flags]` runs
# `python -m franca.eval.MODULE` on the checkpoint, writing into ${CHECKPOINT_DIR}/SUBDIR.
#
# Environment:
#   OUTPUT_DIR                     required: the training output folder (it holds config.yaml and eval/)
#   ITERATION                      required: the checkpoint iteration (eval/training_<ITERATION>/teacher_checkpoint.pth)
#   IMAGENET_ROOT, IMAGENET_EXTRA  ImageNet-1k folder and metadata folder, unless both datasets below are set
#   TRAIN_DATASET, VAL_DATASET     optional dataset strings (default: the ImageNet TRAIN / VAL splits)
set -euo pipefail

: "${OUTPUT_DIR:?set OUTPUT_DIR to the training output folder (it holds config.yaml and eval/)}"
: "${ITERATION:?set ITERATION to the checkpoint iteration (eval/training_<ITERATION>/teacher_checkpoint.pth)}"
if [[ -z "${TRAIN_DATASET:-}" || -z "${VAL_DATASET:-}" ]]; then
    : "${IMAGENET_ROOT:?set IMAGENET_ROOT and IMAGENET_EXTRA, or TRAIN_DATASET and VAL_DATASET}"
    : "${IMAGENET_EXTRA:?set IMAGENET_EXTRA (the folder of the ImageNet metadata files)}"
fi
TRAIN_DATASET=${TRAIN_DATASET:-ImageNet:split=TRAIN:root=${IMAGENET_ROOT:-}:extra=${IMAGENET_EXTRA:-}}
VAL_DATASET=${VAL_DATASET:-ImageNet:split=VAL:root=${IMAGENET_ROOT:-}:extra=${IMAGENET_EXTRA:-}}
CHECKPOINT_DIR="${OUTPUT_DIR}/eval/training_${ITERATION}"

export MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
export PYTHONPATH="${SLURM_SUBMIT_DIR:-$PWD}${PYTHONPATH:+:${PYTHONPATH}}"
cd "${SLURM_SUBMIT_DIR:-$PWD}"

run_eval() {
    local module=$1 subdir=$2
    shift 2
    srun python -m "franca.eval.${module}" \
        --config-file "${OUTPUT_DIR}/config.yaml" \
        --pretrained-weights "${CHECKPOINT_DIR}/teacher_checkpoint.pth" \
        --output-dir "${CHECKPOINT_DIR}/${subdir}" \
        --train-dataset "${TRAIN_DATASET}" \
        --val-dataset "${VAL_DATASET}" \
        "$@"
}
