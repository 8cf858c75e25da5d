#!/bin/bash
# Submit a job array over protocols x datasets x seeds (default: base2new, the 11 CoOp datasets, seeds 1-3).
#
#   CONFIGS="--config configs/backbone/clip_vit_b16.yaml --config configs/prompt/coop.yaml" scripts/slurm/sweep.sh
#   PROTOCOLS="base2new fewshot" DATASETS="oxford_pets eurosat" SEEDS="1 2 3" CONFIGS=... scripts/slurm/sweep.sh
# Then: python scripts/reproduce/aggregate.py runs/sweep
set -euo pipefail
export PROTOCOLS="${PROTOCOLS:-base2new}"
export DATASETS="${DATASETS:-imagenet caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101}"
export SEEDS="${SEEDS:-1 2 3}"
export CONFIGS="${CONFIGS:?set CONFIGS to the backbone/prompt --config list}"
read -r -a p <<< "$PROTOCOLS"; read -r -a d <<< "$DATASETS"; read -r -a s <<< "$SEEDS"
for ds in "${d[@]}"; do
  [ -f "configs/data/$ds.yaml" ] || { echo "no configs/data/$ds.yaml" >&2; exit 2; }
done
n=$(( ${#p[@]} * ${#d[@]} * ${#s[@]} ))
mkdir -p runs/slurm
${SBATCH:-sbatch} --array="0-$((n - 1))" --export=ALL "$@" scripts/slurm/sweep_task.sbatch
