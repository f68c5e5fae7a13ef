#!/usr/bin/env bash
# The prepared GPU check: one node, >= 1 GPU, no internet, a python3 that has a CUDA torch.
#
#   benchmarks/gpu_check.sh WHEELHOUSE OUT
#
# WHEELHOUSE comes from tools/build_wheelhouse.sh (megatron-core, deepspeed, pydantic, ...);
# it is installed with `pip install --no-index --no-deps --target` into a scratch folder put on
# PYTHONPATH, the project runs from this checkout. Then, each step under a `timeout`
# (planned: under 7 minutes in all on one H100; not yet timed on a GPU since the trainer steps
# were added):
#   1. pytest -m gpu tests/gpu   sdpa vs local, recompute vs none, a bf16 step, a 10-step
#                                `deepspeed --num_gpus 1` pythia-160m mesh run in bf16 and in fp16
#                                (loss scaling), loss falling in both
#   2. the trainer's real path   `deepspeed --num_gpus 1 pretrain_mesh.py`: pythia-1.4b mesh
#                                (examples/configs/pythia-1.4b-mesh.yaml's model, vocab 50,304) at
#                                seq 4096, bf16, micro-batch 4 x 8 accumulated, examples/zero1.json,
#                                6 steps logged every 2 (MFU logged twice after the warm-up window);
#                                pythia-160m on zero0.json with two evals, and on zero2.json saved at
#                                step 3 (exit), then resumed to step 6
#   3. benchmarks/throughput.py  the trainer's step at the 1.4b shape above (base and mesh), and
#                                pythia-160m vanilla/mesh eager and --compile with HF GPTNeoX
#   4. OUT/gpu_report.md + OUT/gpu_report.json: card, date, versions, the trainer's logged MFU
#      beside throughput.py's at the same shape, the 160m checks, the tables
# Any failing step stops the check with a non-zero exit and OUT/FAILED naming the step; no
# report is written then (never a partial table).
#
# Environment:
#   PYTHON=python3          the interpreter with CUDA torch
#   MCORE_VERSION=0.16.1    which megatron-core folder of the wheelhouse to install
#   GPU_CHECK_DRY=1         the same steps at tiny size on CPU (debug this script off the GPU);
#                           the install is skipped when the wheelhouse is for another Python
#   GPU_CHECK_PYTEST_K      a pytest -k expression to narrow the gpu tests (e.g. "not deepspeed");
#                           the report lists the test cases that ran
set -euo pipefail

PY="${PYTHON:-python3}"
MCORE="${MCORE_VERSION:-0.16.1}"
DRY="${GPU_CHECK_DRY:-0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)

log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
die() { log "FAILED: $*" >&2; [[ -n "${OUT:-}" && -d "$OUT" ]] && echo "$*" > "$OUT/FAILED"; exit 1; }

[[ $# -eq 2 ]] || { echo "usage: $0 WHEELHOUSE OUT   (env GPU_CHECK_DRY=1 for a CPU dry run)" >&2; exit 2; }
WHEELHOUSE="$(cd "$1" 2>/dev/null && pwd)" || { echo "wheelhouse $1 not found: build it with tools/build_wheelhouse.sh" >&2; exit 2; }
[[ -f "$WHEELHOUSE/MANIFEST.txt" ]] || { echo "$WHEELHOUSE has no MANIFEST.txt: build it with tools/build_wheelhouse.sh" >&2; exit 2; }
mkdir -p "$2"
OUT="$(cd "$2" && pwd)"
# The test suite checks that it leaves the checkout untouched: logs must land outside it.
case "$OUT/" in "$ROOT"/*) echo "OUT $OUT is inside the checkout $ROOT: pass a folder outside it" >&2; exit 2 ;; esac
rm -f "$OUT/FAILED" "$OUT/gpu_report.md" "$OUT/gpu_report.json"

# run NAME SECONDS CMD...: one step, timed out, output teed to OUT/logs/NAME.log.
mkdir -p "$OUT/logs"
run() {
    local name="$1" limit="$2"; shift 2
    log "step '$name' (timeout ${limit}s): $*"
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/logs/$name.log"
    local rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then die "step '$name' timed out after ${limit}s (log: $OUT/logs/$name.log)"; fi
    [[ $rc -eq 0 ]] || die "step '$name' exited with $rc (log: $OUT/logs/$name.log)"
    log "step '$name' done"
}

# ---------------------------------------------------------------- 0. interpreter and device
command -v "$PY" >/dev/null || die "step 'python': $PY not found (set PYTHON=...)"
"$PY" -c "import torch" 2>/dev/null || die "step 'python': $PY cannot import torch (a CUDA torch is expected)"
if [[ "$DRY" == 1 ]]; then
    DEVICE=cpu
    log "dry run: CPU, tiny sizes"
else
    DEVICE=cuda
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || die "step 'device': torch sees no CUDA device (GPU_CHECK_DRY=1 runs this on CPU)"
    command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$OUT/logs/nvidia-smi.log"
fi

# ---------------------------------------------------------------- 1. install the wheelhouse
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
SITE="$(mktemp -d "${TMPDIR:-/tmp}/mesh_gpu_check.XXXXXX")/site"
trap 'rm -rf "$(dirname "$SITE")"' EXIT
if compgen -G "$WHEELHOUSE/pydantic_core-*-$PYTAG-*.whl" >/dev/null; then
    [[ -d "$WHEELHOUSE/megatron-core-$MCORE" ]] || die "step 'install': no megatron-core-$MCORE in $WHEELHOUSE (MCORE_VERSION=...)"
    run install 120 "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" \
        "$WHEELHOUSE"/*.whl "$WHEELHOUSE/megatron-core-$MCORE"/*.whl
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"  # the deepspeed launcher
elif [[ "$DRY" == 1 ]]; then
    log "step 'install' skipped: the wheelhouse is not for $PYTAG; dry run uses this environment"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    PYBIN="$(dirname "$(command -v "$PY")")"
    export PATH="$PYBIN:$PATH"
else
    die "step 'install': $WHEELHOUSE has no wheels for $PYTAG (rebuild with --python-version ${PYTAG:2:1}.${PYTAG:3})"
fi
export DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONDONTWRITEBYTECODE=1
cd "$ROOT"

run versions 120 "$PY" -c "
import json, torch, megatron.core, deepspeed, transformers
info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'megatron_core': megatron.core.__version__,
        'deepspeed': deepspeed.__version__, 'transformers': transformers.__version__,
        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
        'device_count': torch.cuda.device_count()}
print(json.dumps(info))
json.dump(info, open('$OUT/logs/versions.json', 'w'))
"

# ---------------------------------------------------------------- 2. correctness on the device
PYTEST_ARGS=(-q -m gpu -p no:cacheprovider tests/gpu --junitxml "$OUT/logs/pytest-gpu.xml")
if [[ -n "${GPU_CHECK_PYTEST_K:-}" ]]; then PYTEST_ARGS+=(-k "$GPU_CHECK_PYTEST_K"); fi
run pytest-gpu 300 "$PY" -m pytest "${PYTEST_ARGS[@]}"

# ---------------------------------------------------------------- 3. the trainer's real path
# `deepspeed --num_gpus 1 pretrain_mesh.py` on the embedded corpus (no data files offline). The
# big run takes the recipe's model with its vocabulary fixed (the recipe's tokenizer is not
# here; the embedded one fits in it), so its FLOPs per token are throughput.py's at that shape.
DS=(deepspeed --num_gpus 1 --master_port "$(( 29500 + $$ % 1000 ))" pretrain_mesh.py)
COMMON=(--sample-tokens 0 --data-cache-dir "$OUT/cache")
if [[ "$DRY" == 1 ]]; then
    BIG_PRESET=tiny BIG_SEQ=64 SMALL=(--preset tiny --seq-length 64 --micro-batch-size 2 --global-batch-size 4)
else
    BIG_PRESET=pythia-1.4b BIG_SEQ=4096
    SMALL=(--preset pythia-160m --seq-length 1024 --micro-batch-size 4 --global-batch-size 8)
fi
BIG_MICRO=4 BIG_ACCUM=8
"$PY" - "$BIG_PRESET" "$BIG_SEQ" "$OUT/logs/trainer-big.yaml" <<'PYEOF' || die "step 'recipe': cannot write the big run's recipe"
import sys, yaml
from mesh_megatron.config import preset
name, seq, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
recipe = yaml.safe_load(open("examples/configs/pythia-1.4b-mesh.yaml"))
model = dict(recipe["model"], seq_length=seq, vocab_size=preset(name).vocab_size)
if name != recipe["model"]["preset"]:  # dry run: the same recipe at tiny size
    model = {"preset": name, "variant": "mesh", "seq_length": seq, "vocab_size": preset(name).vocab_size}
yaml.safe_dump({"model": model, "training": {k: recipe["training"][k] for k in ("lr", "min_lr", "weight_decay",
                "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "seed")}}, open(path, "w"))
PYEOF
run train-big 240 "${DS[@]}" --config "$OUT/logs/trainer-big.yaml" --bf16 --ds_config examples/zero1.json \
    --micro-batch-size "$BIG_MICRO" --global-batch-size $(( BIG_MICRO * BIG_ACCUM )) --train-iters 6 \
    --log-interval 2 --eval-interval 0 --save "$OUT/ckpt/big" \
    --log-jsonl "$OUT/logs/train-big.jsonl" "${COMMON[@]}"
rm -rf "$OUT/ckpt/big"  # the 1.4b checkpoint (~20 GB with its optimizer state): not needed further
run train-small-zero0 120 "${DS[@]}" "${SMALL[@]}" --bf16 --ds_config examples/zero0.json --train-iters 4 \
    --log-interval 2 --eval-interval 2 --eval-iters 2 --save "$OUT/ckpt/small-zero0" "${COMMON[@]}"
run train-small-zero2 120 "${DS[@]}" "${SMALL[@]}" --bf16 --ds_config examples/zero2.json --train-iters 6 \
    --exit-interval 3 --log-interval 1 --eval-interval 3 --eval-iters 2 --save "$OUT/ckpt/small-zero2" \
    --log-jsonl "$OUT/logs/train-small-zero2.jsonl" "${COMMON[@]}"
run resume-small-zero2 120 "${DS[@]}" "${SMALL[@]}" --bf16 --ds_config examples/zero2.json --train-iters 6 \
    --log-interval 1 --eval-interval 3 --eval-iters 2 --load "$OUT/ckpt/small-zero2" --save "$OUT/ckpt/small-zero2" \
    --log-jsonl "$OUT/logs/resume-small-zero2.jsonl" "${COMMON[@]}"
rm -rf "$OUT/ckpt" "$OUT/cache"

# ---------------------------------------------------------------- 4. throughput
# "trainer-shape": the big run's shape, the trainer's step (throughput.py builds it the same way).
TP=(benchmarks/throughput.py --device "$DEVICE")
SHAPE="--preset $BIG_PRESET --seq-length $BIG_SEQ --micro-batch-size $BIG_MICRO --grad-accum $BIG_ACCUM --bf16 --ds_config examples/zero1.json --variants base,mesh"
if [[ "$DRY" == 1 ]]; then
    BENCH=("trainer-shape|$SHAPE --steps 2 --warmup 1"
           "tiny-hf|--preset tiny --seq-length 64 --micro-batch-size 2 --steps 2 --variants vanilla,base,mesh --hf --bf16")
else
    BENCH=("trainer-shape|$SHAPE --steps 3 --warmup 1"
           "pythia-160m-hf|--preset pythia-160m --seq-length 2048 --micro-batch-size 4 --bf16 --steps 5 --variants vanilla,mesh --compile --hf")
fi
for spec in "${BENCH[@]}"; do
    name="${spec%%|*}"
    read -r -a flags <<< "${spec#*|}"
    run "throughput-$name" 180 "$PY" "${TP[@]}" "${flags[@]}" --out "$OUT/throughput/$name"
done

# ---------------------------------------------------------------- 5. the report (all steps passed)
run report 60 "$PY" benchmarks/gpu_report.py "$OUT"
log "all steps passed: $OUT/gpu_report.md"
