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

# sbatch runs a copy of this script, so common.sh is found beside it or under the submit directory.
here=$(dirname "${BASH_SOURCE[0]}")
[[ -f "${here}/common.sh" ]] || here="${SLURM_SUBMIT_DIR:-$PWD}/scripts/eval"
source "${here}/common.sh"

run_eval linear linear "$@"
