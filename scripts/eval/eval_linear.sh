#!/bin/bash
# Linear-probe evaluation of a teacher checkpoint (python -m franca.eval.linear) as a SLURM job.
# Adapt the #SBATCH lines to your cluster, then submit from the repository root:
#   OUTPUT_DIR=/path/to/training/run ITERATION=624999 IMAGENET_ROOT=/path/to/imagenet \
#   IMAGENET_EXTRA=/path/to/imagenet/extra sbatch scripts/eval/eval_linear.sh [extra linear flags]
# Any other dataset: set TRAIN_DATASET / VAL_DATASET (e.g. ImageFolder:root=/data/train).
#SBATCH --job-name=franca-linear
#SBATCH --nodes=1                        # several nodes work too: the features are sharded
#SBATCH --ntasks-per-node=4              # one process per GPU
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=10
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
##SBATCH --account=<account>             # remove one '#' and fill in if your cluster asks for them
##SBATCH --partition=<partition>

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

srun python -m franca.eval.linear \
    --config-file "${OUTPUT_DIR}/config.yaml" \
    --pretrained-weights "${CHECKPOINT_DIR}/teacher_checkpoint.pth" \
    --output-dir "${CHECKPOINT_DIR}/linear" \
    --train-dataset "${TRAIN_DATASET}" \
    --val-dataset "${VAL_DATASET}" \
    "$@"
