#!/usr/bin/env bash
# After methods_point.sh: export each trained model and measure its loss at inference depths
# 1..2K (K = 2) on held-out docstring data (the validation split, 969,30,1 as in training:
# documents never trained on; 512 samples of 128 tokens = 65,536 predicted tokens).
# A model that refuses a depth (per-step MeSH routers exist for K + 1 steps; MoR has one router
# and capacity per recursion) is measured depth by depth and the refusal recorded.
set -uo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
RUNS=${RUNS:-/work/ab_runs/r05}
OUT=docs/ablation/methods/depth
mkdir -p $OUT
for run in main/base main/mesh main/base-rr main/mesh-rr mor/mor; do
  label=$(basename $run)
  hf=$RUNS/hf/$label
  [ -f $RUNS/$run-s1234/done.json ] || { echo "$label: not trained yet, skipped"; continue; }
  [ -f $OUT/$label.json ] || [ -f $OUT/$label-n1.txt ] && { echo "$label: measured earlier"; continue; }
  [ -f $hf/config.json ] || nice -n 10 $PY tools/convert_to_hf.py --load $RUNS/$run-s1234/ckpt --out $hf --quiet --force
  EVAL=(tools/eval_lm.py --model-dir $hf --perplexity-data /tmp/docs --perplexity-split valid
        --perplexity-samples 512 --perplexity-batch-size 16)
  if ! nice -n 10 $PY "${EVAL[@]}" --num-loops 1,2,3,4 --output $OUT/$label.json --force \
        > $OUT/$label.txt 2>&1; then
    rm -f $OUT/$label.json
    nice -n 10 $PY "${EVAL[@]}" --output $OUT/$label-default.json --force > $OUT/$label-default.txt 2>&1
    for n in 1 2 3 4; do
      nice -n 10 $PY "${EVAL[@]}" --num-loops $n --output $OUT/$label-n$n.json --force \
          > $OUT/$label-n$n.txt 2>&1 || echo "refused: $(grep -v -i warn $OUT/$label-n$n.txt | tail -1)" >> $OUT/$label-n$n.txt
    done
  fi
done
# MoR's plain forward routes by training's top-k over the whole sequence (it sees later tokens'
# router scores); generation routes causally (sigmoid > 0.5). The same weights measured that way:
if [ -f $RUNS/hf/mor/config.json ] && [ ! -f $OUT/mor-threshold-n2.json ]; then
  rm -rf $RUNS/hf/mor-threshold && cp -r $RUNS/hf/mor $RUNS/hf/mor-threshold
  $PY -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['mor_inference']='threshold'; json.dump(c, open(p,'w'), indent=2)" $RUNS/hf/mor-threshold/config.json
  nice -n 10 $PY tools/eval_lm.py --model-dir $RUNS/hf/mor-threshold --perplexity-data /tmp/docs --perplexity-split valid \
    --perplexity-samples 512 --perplexity-batch-size 16 --output $OUT/mor-threshold-n2.json --force > $OUT/mor-threshold-n2.txt 2>&1
fi
[ -f docs/ablation/methods/mor/results.json ] && $PY docs/ablation/methods/report.py
