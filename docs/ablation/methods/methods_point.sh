#!/usr/bin/env bash
# Issue 20 item 7 + issue 22 item 7: fixed depth (base, mesh) vs random recurrence (base-rr,
# mesh-rr) at matched expected training FLOPs, and MoR (expert choice, default capacities 1, 0.5)
# at matched training FLOPs (more tokens), on the docstring corpus (/tmp/docs) in the README's
# ablation recipe; then the depth sweep of each exported model. One seed; 2-core CPU, this machine,
# one core (OMP_NUM_THREADS=1, --jobs 1).
#
# Matched compute (tools/model_summary.py --config docs/ablation/docstrings-2m/recipe.yaml):
#   base fixed K=2: 11,403,264 train FLOPs/token; mesh: 11,426,304
#   --mean-recurrence 1.54 --backprop-depth 2: 11,399,901 expected (E[n] 2.54, E[grad] 1.73)
#   mor (capacities 1, 0.5): 9,930,240 -> 1.148x the tokens (280 steps vs 244; 1.1475)
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
RUNS=${RUNS:-/work/ab_runs/r05}
OUT=docs/ablation/methods
RR="--recurrence-sampling poisson-lognormal --mean-recurrence 1.54 --backprop-depth 2"
COMMON=(--preset tiny --layout 1+2R2+1 --hidden-size 128 --seq-length 128 --micro-batch-size 16
        --global-batch-size 16 --lr 3e-3 --min-lr 3e-4 --ds-config examples/zero0.json
        --data-path /tmp/docs --tokenizer-type sentencepiece
        --tokenizer-model mesh_megatron/data/corpus/tokenizer.model --seeds 1 --jobs 1)

# 1. fixed vs random recurrence, 0.5M tokens (244 steps), validation every 61 steps
nice -n 10 $PY tools/ablate.py "${COMMON[@]}" --variants base,mesh \
    --arm "base-rr=base $RR" --arm "mesh-rr=mesh --mesh-routers shared --mesh-step-embedding $RR" \
    --tokens 2.5e5,5e5 --evals-per-budget 2 --out $OUT/fixed-vs-rr --runs-dir $RUNS/main

# 2. MoR at matched training FLOPs: 1.148 x 0.5M tokens (280 steps), validation every 70 steps
nice -n 10 $PY tools/ablate.py "${COMMON[@]}" --variants mor \
    --tokens 2.87075e5,5.7415e5 --evals-per-budget 2 --out $OUT/mor --runs-dir $RUNS/mor
