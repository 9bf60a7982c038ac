#!/usr/bin/env bash
# The GPU check in one command (docs/benchmarks.md, "GPU check"):
#   bash scripts/gpu_check.sh OUT_DIR [--dry-run] [--budget SECONDS] [--steps a,b,...] [--data-dir DIR]
# writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md and OUT_DIR/logs/ (python -m pnnh.bench.gpu_check).
#
# Python: $PNNH_GPU_PYTHON if set, else the first of .venv/bin/python, .venv-gpu/bin/python, python3
# whose torch sees a CUDA device (with --dry-run: any torch). pnnh runs from this checkout (PYTHONPATH),
# nothing is installed into the system: when pnnh's dependencies or pytest do not import, a venv
# .venv-gpu is made over the system Python (--system-site-packages: it keeps the machine's CUDA torch,
# timm, torchvision) and the missing ones go into it, from wheels/ without network if that directory
# exists (make gpu-wheels fills it), else from PyPI.
# Fashion-MNIST: $PNNH_DATA, else data/fashion-mnist/ in this checkout, else the system directory.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--dry-run] [--budget S] [--steps a,b] [--data-dir DIR]}
shift
need_cuda=1
for arg in "$@"; do [ "$arg" = --dry-run ] && need_cuda=0; done

usable() {  # usable PYTHON: its torch imports (and sees CUDA unless this is a dry run)
  [ -n "$1" ] && command -v "$1" >/dev/null || return 1
  "$1" -c "import sys, torch; sys.exit(0 if $need_cuda == 0 or torch.cuda.is_available() else 1)" 2>/dev/null
}
PY=""
for cand in "${PNNH_GPU_PYTHON:-}" .venv/bin/python .venv-gpu/bin/python "${PYTHON:-python3}"; do
  if usable "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  echo "error: no Python here whose torch $([ $need_cuda = 1 ] && echo 'sees a CUDA device' || echo imports);" \
       "set PNNH_GPU_PYTHON to one" >&2
  exit 2
fi

# what pnnh and the CUDA tests import, as pip names
missing=$("$PY" -c '
import importlib.util
mods = {"numpy": "numpy", "safetensors": "safetensors", "click": "click", "tqdm": "tqdm", "yaml": "PyYAML",
        "pytest": "pytest"}
print(" ".join(pip for mod, pip in mods.items() if importlib.util.find_spec(mod) is None))')
if [ -n "$missing" ]; then
  if [ "$PY" != .venv-gpu/bin/python ] && [ "$PY" != .venv/bin/python ]; then
    echo "gpu_check: $missing missing for $PY: making .venv-gpu over it (--system-site-packages)" >&2
    "$PY" -m venv --system-site-packages .venv-gpu 2>/dev/null \
      || { rm -rf .venv-gpu; "$PY" -m venv --system-site-packages --without-pip .venv-gpu; }
    PY=.venv-gpu/bin/python
  fi
  src=(); [ -d wheels ] && src=(--no-index --find-links wheels)
  for pkg in $missing; do  # one at a time: a package that cannot be had does not block the others
    "$PY" -m pip install -q ${src[@]+"${src[@]}"} "$pkg" \
      || echo "gpu_check: warning: could not install $pkg ${src:+from wheels/}(the steps that need it will fail)" >&2
  done
fi

if [ -z "${PNNH_DATA:-}" ] && [ -d data/fashion-mnist ]; then export PNNH_DATA=$PWD/data; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: running with $PY" >&2
exec "$PY" -m pnnh.bench.gpu_check "$OUT" "$@"
