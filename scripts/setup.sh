#!/usr/bin/env bash
# Set up .venv/ in the repository root: pinned torch, then cfga with the workflow and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# pip quietly; the local mirror's "Location ... is ignored" notices are dropped, errors kept
pip_q() { .venv/bin/pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored" >&2); }
echo "[setup] installing torch (pinned: requirements/torch.txt)"
pip_q -r requirements/torch.txt
echo "[setup] installing cfga[workflow,test]"
# -c keeps any dependency from replacing the pinned torch build
pip_q -c requirements/torch.txt -e ".[workflow,test]"
.venv/bin/python -c "import torch, torchvision, cfga, snakemake; print('[setup] ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
