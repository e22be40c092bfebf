#!/usr/bin/env bash
# Create .venv and install finetune-flows with its test tools, the MLflow auth server extra and the PostgreSQL
# driver (the postgres extra: mlflow/server.sh on a postgresql:// store).
# torch goes first, as a CPU build: a bare `torch` requirement on a CPU-only machine downloads a multi-GB CUDA
# build. On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index) before running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    .venv/bin/pip install -q "$TORCH_SPEC"
  elif ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1 || [ "$(uname -s)" != "Linux" ]; then
    .venv/bin/pip install -q "torch==2.13.0"          # a CPU wheel lies in pip's find-links here
  else
    .venv/bin/pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      || .venv/bin/pip install -q "torch==2.13.0"
  fi
fi
# auth: MLflow's basic-auth server app; postgres: the drivers for a PostgreSQL store (both for mlflow/server.sh);
# ray: prefect-ray, Ray and Optuna for `finetune sweep`
.venv/bin/pip install -q -e ".[dev,auth,postgres,ray]"
echo "installed: $(.venv/bin/python -c 'import torch, transformers, trl, mlflow, prefect; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, mlflow {mlflow.__version__}, prefect {prefect.__version__}")')"
