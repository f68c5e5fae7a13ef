#!/usr/bin/env bash
# Build, on a connected machine, a wheelhouse of everything mesh-megatron needs besides torch,
# for an offline GPU node whose Python already has a CUDA torch (benchmarks/gpu_check.sh
# installs it there with `pip install --no-index --no-deps --target`).
#
#   tools/build_wheelhouse.sh DIR [--python-version 3.12] [--pip PIP]
#
# DIR/ gets:
#   *.whl                     deepspeed (built here as a pure-Python wheel: --no-build-isolation
#                             --no-deps, so no CUDA torch is pulled) and its runtime deps
#   megatron-core-X.Y.Z/*.whl one folder per megatron-core release with a wheel for that Python
#                             (0.16.1, the tested pin, and 0.19.2, the newest for Python 3.12)
#   MANIFEST.txt              file, size, sha256
# The GPU image is assumed to have torch, transformers, tokenizers, sentencepiece, safetensors,
# tensorboard, pytest, numpy; anything small it might lack is carried anyway. The project itself
# runs from its checkout (PYTHONPATH), so the node needs the checkout and this folder.
set -euo pipefail

usage() { echo "usage: $0 DIR [--python-version 3.12] [--pip PIP]" >&2; exit 2; }

DIR=""
PYVER="3.12"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP="${HERE}/.venv/bin/pip"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) PYVER="${2:?--python-version needs a value, e.g. 3.12}"; shift 2 ;;
        --pip) PIP="${2:?--pip needs a path}"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [[ -z "$DIR" ]] || usage; DIR="$1"; shift ;;
    esac
done
[[ -n "$DIR" ]] || usage
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "--python-version must look like 3.12, got '$PYVER'" >&2; exit 2; }
# An existing DIR is replaced only if it is a wheelhouse this script wrote.
if [[ -e "$DIR" && ! -f "$DIR/MANIFEST.txt" ]] && [[ -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
    echo "$DIR exists and is not a wheelhouse (no MANIFEST.txt): pick an empty or new folder" >&2; exit 2
fi
[[ -x "$PIP" ]] || { echo "pip not found at $PIP: run 'make setup' or pass --pip" >&2; exit 2; }

MEGATRON_VERSIONS=(0.16.1 0.19.2)
DEEPSPEED_VERSION=0.19.8
# Pure-Python runtime deps of deepspeed / megatron-core / the project.
PURE=(hjson py-cpuinfo einops annotated-types typing-inspection typing-extensions packaging tqdm
      "pydantic==2.*")
# Compiled ones, for the target Python (cp312 manylinux).
BINARY=(pydantic-core msgpack psutil pyyaml ninja)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}")

# Build into a scratch folder and move it in place at the end: never a half-built wheelhouse.
mkdir -p "$(dirname "$DIR")"
STAGE="$(mktemp -d "${DIR%/}.partial.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

echo "[wheelhouse] megatron-core for Python $PYVER"
for v in "${MEGATRON_VERSIONS[@]}"; do
    if "$PIP" download --quiet --no-deps "${TARGET[@]}" -d "$STAGE/megatron-core-$v" "megatron-core==$v"; then
        echo "  megatron-core $v: $(ls "$STAGE/megatron-core-$v")"
    else
        echo "  megatron-core $v: no wheel for Python $PYVER, skipped" >&2
        rm -rf "${STAGE:?}/megatron-core-$v"
    fi
done
ls -d "$STAGE"/megatron-core-* >/dev/null 2>&1 || { echo "no megatron-core wheel for Python $PYVER" >&2; exit 1; }

echo "[wheelhouse] pydantic and the other runtime deps"
"$PIP" download --quiet --no-deps "${TARGET[@]}" -d "$STAGE" "${BINARY[@]}" "${PURE[@]}"
# pydantic pins the exact pydantic-core it was built against: fetch that one.
PYD=$(ls "$STAGE"/pydantic-2*.whl)
CORE=$(unzip -p "$PYD" '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
rm -f "$STAGE"/pydantic_core-*.whl
"$PIP" download --quiet --no-deps "${TARGET[@]}" -d "$STAGE" "pydantic-core==$CORE"

echo "[wheelhouse] deepspeed $DEEPSPEED_VERSION (pure-Python wheel, no ops prebuilt)"
DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PIP" wheel --quiet --no-deps --no-build-isolation -w "$STAGE" \
    "deepspeed==$DEEPSPEED_VERSION"

(cd "$STAGE" && find . -name '*.whl' -print0 | sort -z | xargs -0 sha256sum > MANIFEST.txt)
SIZE_KIB=$(du -sk "$STAGE" | cut -f1)
if (( SIZE_KIB > 64 * 1024 )); then
    echo "wheelhouse is ${SIZE_KIB} KiB, over the 64 MiB budget: drop a megatron-core version" >&2
    exit 1
fi
rm -rf "$DIR"
mv "$STAGE" "$DIR"
trap - EXIT
echo "[wheelhouse] $DIR: $(find "$DIR" -name '*.whl' | wc -l) wheels, ${SIZE_KIB} KiB"
