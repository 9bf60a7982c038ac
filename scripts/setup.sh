#!/usr/bin/env bash
# One-time setup, idempotent: system data package, a virtual environment, pnnh and its deps.
#   VENV=.venv (where to install)   TORCH_SPEC="torch==2.13.0" (CPU wheel on the project machines;
#   any torch>=2.1 works for users: set TORCH_SPEC=torch to take your platform's default build)
#   EXTRAS=test (pip extras of pnnh to install)   WITH_BROWSER=1 (also Debian's chromium, for the
#   report's headless-browser test)   WITH_SLURM=1 (also Debian's slurm-wlm and munge, for the test
#   that runs a study on a one-node Slurm cluster: scripts/slurm_local.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
PY=${PYTHON:-python3}

# 1. Fashion-MNIST, the embedded default dataset (Debian package; IDX files in /usr/share/datasets)
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${PNNH_DATA:-}" ]; then
  echo "setup: warning: Fashion-MNIST not installed; put the IDX files in \$PNNH_DATA/fashion-mnist" >&2
fi

# Debian's chromium renders report.html in the browser test (`make test` sets WITH_BROWSER=1).
if [ "${WITH_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian package chromium (for the report's browser test)"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# Debian's Slurm daemons and munge: the Slurm launcher's test starts a one-node cluster (`make test` sets WITH_SLURM=1).
if [ "${WITH_SLURM:-0}" = 1 ] && ! { command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ]; } && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages slurm-wlm and munge (for the Slurm launcher's test)"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. Virtual environment with torch first (so pip does not pick a multi-GB CUDA build), then pnnh.
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "$TORCH_SPEC"
stamp="$VENV/.pnnh-installed-$EXTRAS"
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
echo "setup: ok ($("$VENV/bin/python" -c 'import torch, pnnh; print("pnnh", pnnh.__version__, "torch", torch.__version__)'))"
