#!/usr/bin/env bash
# Every GPU measurement of training throughput and batch size in one run of under 8 minutes on one
# GPU, for GPU sessions that come rarely and short (about 15 minutes, the machine's start included).
#
#   benchmarks/gpu_benchmarks.sh [--device cuda|cpu] [--quick] [--seeds "1 2 3"]
#   benchmarks/gpu_benchmarks.sh --prepare
#
# Run from anywhere; it works in the repository's root. Steps, each under a time limit (`timeout`)
# so that one hanging measurement cannot take the session:
#   setup             a Python with torch (below) and the package's dependencies
#   train_throughput  benchmarks/train_throughput.py --settings: the original recipe, our model step
#                     and our end-to-end epoch, with a row per GPU setting (train.cuda_graphs,
#                     train.tf32, bf16 channels_last, data.on_device), host waits per step, FLOPs
#                     per image and the device's matrix-product rates (bf16, fp16, TF32, fp32)
#   batch_size        benchmarks/batch_size.py: validation SSIM and images/s at batch 64, 256, 1024
#                     after the same images seen (learning rate x sqrt(batch / 64), warm-up over the
#                     same images), over seeds; Fashion-MNIST at 32 px, or where it is absent
#                     photo crops made from scikit-image's photographs (said in the log)
#   summary           benchmarks/gpu_summary.py: each step's status and the targets against the figures
# Everything goes to $OUT if set, else benchmarks/results/gpu_<UTC date and time>[_cpu]/: log.txt,
# steps.tsv, train_throughput.json, batch_size.json, summary.md (five files: a GPU session returns
# at most 8).
#
# --device cpu runs the same steps at tiny sizes (a few images, a few steps, batches of 2 to 32):
# the try on a machine without a GPU. --quick: a shorter GPU run (1 seed, 2 rounds, half the images).
# --seeds: the batch-size seeds (default 1 2 3 on a GPU, 1 2 on a CPU).
#
# Python: $PYTHON if set; else the repository's .venv if its torch imports; else python3 if its torch
# imports (a GPU image's own torch, not the Makefile's pins); else `make .venv/.installed-dev`.
# Modules that Python lacks are installed into a side folder from the wheels in build/gpu-wheels
# when they are there, else from the package index (pip).
#
# --prepare, on a machine with the package index, before a GPU session whose machine has none:
# downloads wheels of the dependencies a GPU image lacks (pydantic and its own dependencies, for
# CPython $GPU_PYTHON, default 3.12, x86-64 Linux) into build/gpu-wheels and copies Fashion-MNIST
# into datasets/fashion-mnist (both ignored by git); the session then carries those two folders.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DEVICE=cuda QUICK=0 SEEDS="" PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:-}; shift 2 || { echo "gpu_benchmarks.sh: --device needs cuda or cpu" >&2; exit 2; } ;;
    --quick) QUICK=1; shift ;;
    --seeds) SEEDS=${2:-}; shift 2 || { echo "gpu_benchmarks.sh: --seeds needs a list, e.g. --seeds '1 2 3'" >&2; exit 2; } ;;
    --prepare) PREPARE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_benchmarks.sh: unknown option '$1'; expected --device cuda|cpu, --quick, --seeds 'N ...' or --prepare" >&2
       exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda|cpu) ;;
  *) echo "gpu_benchmarks.sh: --device '$DEVICE': expected cuda or cpu" >&2; exit 2 ;;
esac
case "$SEEDS" in
  *[!0-9\ ]*) echo "gpu_benchmarks.sh: --seeds '$SEEDS': expected whole numbers separated by spaces" >&2; exit 2 ;;
esac

WHEELS=build/gpu-wheels
SIDE=/tmp/gpu-benchmarks-site  # where missing modules go: the image's own packages stay untouched
# The modules the package and these benchmarks import, and the pip distributions that hold them.
MODULES="pydantic yaml numpy PIL torchvision tqdm tensorboard matplotlib sklearn safetensors scipy skimage"
declare -A DISTRIBUTION=([yaml]=pyyaml [PIL]=pillow [sklearn]=scikit-learn [skimage]=scikit-image)

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  [ -x "$py" ] || py=python3
  mkdir -p "$WHEELS" || return 1
  # The versions this repository is tested with, from the Python that runs its tests here.
  local dist version
  for dist in pydantic pydantic_core annotated_types typing_inspection typing_extensions; do
    version=$("$py" -c "import importlib.metadata as m; print(m.version('$dist'))") || return 1
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" "$dist==$version" || return 1
  done
  echo "wheels in $WHEELS: $(ls "$WHEELS" | tr '\n' ' ')"
  if compgen -G "datasets/fashion-mnist/train-images-idx3-ubyte*" > /dev/null; then
    echo "Fashion-MNIST: datasets/fashion-mnist is there already"
  elif [ -d /usr/share/datasets/fashion-mnist ]; then
    mkdir -p datasets && cp -r /usr/share/datasets/fashion-mnist datasets/fashion-mnist || return 1
    echo "Fashion-MNIST: copied /usr/share/datasets/fashion-mnist to datasets/fashion-mnist"
  else
    echo "Fashion-MNIST: not on this machine; the GPU run will use photo crops for the batch-size rows"
  fi
  echo "a GPU session carries: $WHEELS datasets/fashion-mnist"
}

if [ "$PREPARE" = 1 ]; then
  prepare
  exit $?
fi

missing_modules() {  # the MODULES that "$PY" cannot import, one line, space-separated
  "$PY" - $MODULES <<'EOF'
import importlib.util, sys
print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))
EOF
}

setup() {
  if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
    echo "python: $PY (from \$PYTHON)"
  elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2> /dev/null; then
    PY=.venv/bin/python
    echo "python: the repository's .venv"
  elif python3 -c "import torch" 2> /dev/null; then
    PY=python3
    echo "python: python3 ($(command -v python3)) with its own torch, not the Makefile's pins"
  else
    echo "python: no Python with torch here: make .venv/.installed-dev (torch from the package index)"
    make .venv/.installed-dev || return 1
    PY=.venv/bin/python
  fi
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  local missing
  missing=$(missing_modules) || return 1
  if [ -n "$missing" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "installing into $SIDE, for $missing: the wheels in $WHEELS"
    timeout 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SIDE" "$WHEELS"/*.whl || return 1
    export PYTHONPATH="$PYTHONPATH:$SIDE"
    missing=$(missing_modules) || return 1
  fi
  if [ -n "$missing" ]; then
    local names=() name
    for name in $missing; do names+=("${DISTRIBUTION[$name]:-$name}"); done
    echo "installing into $SIDE from the package index: ${names[*]}"
    timeout 300 "$PY" -m pip install --quiet --target "$SIDE" "${names[@]}" || return 1
    export PYTHONPATH="$PYTHONPATH:$SIDE"
    missing=$(missing_modules) || return 1
  fi
  if [ -n "$missing" ]; then
    echo "still missing: $missing" >&2
    return 1
  fi
  "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import torch; from machine import describe; \
print(describe(), '| CUDA', torch.version.cuda, '| devices', torch.cuda.device_count())" || return 1
  if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device: run with --device cpu for the tiny try" >&2
    return 1
  fi
}

step() {  # NAME LIMIT_SECONDS COMMAND...: COMMAND under its time limit, recorded in steps.tsv
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "== $name (time limit $limit s): $*"
  timeout -k 10 "$limit" "$@"
  status=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >> "$OUT/steps.tsv"
  echo "== $name: exit status $status after $((SECONDS - start)) s"
}

run_all() {
  local start=$SECONDS
  echo "gpu_benchmarks.sh --device $DEVICE$([ "$QUICK" = 1 ] && echo " --quick") into $OUT, $(date -u '+%Y-%m-%d %H:%M UTC')"
  if ! setup; then
    printf 'setup\t1\t%s\t-\n' "$((SECONDS - start))" >> "$OUT/steps.tsv"
    echo "setup failed: nothing measured" >&2
    return 1
  fi
  printf 'setup\t0\t%s\t-\n' "$((SECONDS - start))" >> "$OUT/steps.tsv"
  export PYTHONUNBUFFERED=1

  local throughput batches fashion=datasets/fashion-mnist dataset=fashion-mnist
  local seeds=$SEEDS
  if [ "$DEVICE" = cuda ]; then
    # The settings of the H200 run in benchmarks/results/train_throughput_h200.json (121 s with 8
    # pipelines), with a row per GPU setting.
    throughput=(--images 10000 --workers 16 --rounds 5 --steps-per-round 150)
    batches=(--images-seen 120000)
    [ -n "$seeds" ] || seeds="1 2 3"
    if [ "$QUICK" = 1 ]; then
      throughput=(--images 10000 --workers 16 --rounds 2 --steps-per-round 100)
      batches=(--images-seen 60000)
      [ -n "$SEEDS" ] || seeds="1"
    fi
    limits=(240 180)
  else
    throughput=(--images 32 --valid-images 16 --workers 1 --rounds 1 --steps-per-round 2 --batch-size 2
                --matmul-size 512)
    batches=(--batch-sizes 8 16 32 --images-seen 64 --valid-images 64)
    [ -n "$seeds" ] || seeds="1 2"
    limits=(600 300)  # a shared 2-core machine: minutes where a GPU takes seconds
  fi
  if ! compgen -G "$fashion/train-images-idx3-ubyte*" > /dev/null; then
    fashion=/usr/share/datasets/fashion-mnist
    if ! compgen -G "$fashion/train-images-idx3-ubyte*" > /dev/null; then
      dataset=photos
      echo "Fashion-MNIST is neither in datasets/fashion-mnist nor in $fashion: the batch-size rows train on" \
           "photo crops from scikit-image's photographs instead (run --prepare where it is, and carry the folder)"
    fi
  fi
  [ "$dataset" = photos ] && [ "$DEVICE" = cpu ] && batches+=(--photo-crops 256)

  step train_throughput "${limits[0]}" "$PY" benchmarks/train_throughput.py --device "$DEVICE" --settings \
    "${throughput[@]}" --memory-images 0 --quality-steps 0 --work-dir /tmp/gpu-benchmarks-throughput \
    --json "$OUT/train_throughput.json"
  # shellcheck disable=SC2086  # the seeds are separate arguments
  step batch_size "${limits[1]}" "$PY" benchmarks/batch_size.py --dataset "$dataset" --image-size 32 \
    "${batches[@]}" --seeds $seeds --json "$OUT/batch_size.json"
  step summary 30 "$PY" benchmarks/gpu_summary.py "$OUT"
  echo "total: $((SECONDS - start)) s (the GPU run must stay under 480 s)"
}

suffix=$([ "$DEVICE" = cpu ] && echo _cpu)
OUT=${OUT:-benchmarks/results/gpu_$(date -u +%Y-%m-%d_%H%M)$suffix}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
: > "$OUT/steps.tsv"
run_all 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
# Every step ran (and was recorded in steps.tsv) even where one failed; the exit status says
# whether all of them ended well.
[ "$status" = 0 ] && ! cut -f2 "$OUT/steps.tsv" | grep -qv '^0$'
