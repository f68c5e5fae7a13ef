#!/usr/bin/env bash
# Issue 21's measured point: vanilla (6 layers, tiny width 128) on the docstring corpus, imported as
# 1+2R2+1 base (stepwise) at LoRA ranks 0, 8, 32, full, each fine-tuned for the same tokens.
# Needs the docstring corpus at /tmp/docs (README, Ablation). Writes under runs/rrt/.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
export OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
R=runs/rrt; CFG=docs/ablation/docstrings-2m/recipe.yaml
mkdir -p $R
[ -f $R/vanilla/latest ] || $PY pretrain_mesh.py --config $CFG --variant vanilla --layout 6 --train-iters 500 \
    --eval-interval 125 --save $R/vanilla --log-jsonl $R/vanilla.jsonl > $R/vanilla.out 2>&1
[ -d $R/vanilla-hf ] || $PY tools/convert_to_hf.py --load $R/vanilla --out $R/vanilla-hf > $R/export.out 2>&1
for r in 0 8 32 full; do
  [ -d $R/import-r$r ] || $PY tools/convert_from_hf.py --hf $R/vanilla-hf --save $R/import-r$r --layout 1+2R2+1 \
      --variant base --init stepwise --lora-rank $r > $R/import-r$r.out 2>&1
  [ -f $R/ft-r$r/latest ] || $PY pretrain_mesh.py --config $R/import-r$r/model.yaml --load $R/import-r$r --save $R/ft-r$r \
      --data-path /tmp/docs --tokenizer-type sentencepiece --tokenizer-model mesh_megatron/data/corpus/tokenizer.model \
      --ds_config examples/zero0.json --micro-batch-size 16 --global-batch-size 16 --seq-length 128 --train-iters 150 \
      --lr 1e-3 --min-lr 1e-4 --eval-interval 75 --eval-iters 6 --sample-tokens 0 --log-jsonl $R/ft-r$r.jsonl > $R/ft-r$r.out 2>&1
done
echo done
