#!/usr/bin/env bash
# Run a real MLflow tracking + registry server with one command.
#
#   bash mlflow/server.sh                      # sqlite store in mlflow/store/server/, http://127.0.0.1:5000
#   MLFLOW_PORT=5001 bash mlflow/server.sh
#   MLFLOW_BACKEND_STORE_URI=postgresql://user:pw@db/mlflow MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow \
#     MLFLOW_HOST=0.0.0.0 bash mlflow/server.sh
#
# Then, for training, predicting and the `finetune` commands:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Settings (environment variables, all optional):
#   MLFLOW_BACKEND_STORE_URI      runs + registry database     (default sqlite:///mlflow/store/server/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server keeps artifacts; clients upload through the server
#                                 (mlflow-artifacts:/), so they need no access to it (default mlflow/store/server/artifacts)
#   MLFLOW_DEFAULT_ARTIFACT_ROOT  instead: an artifact root clients write to directly (shared disk, s3://...);
#                                 turns artifact proxying off
#   MLFLOW_HOST / MLFLOW_PORT     bind address (default 127.0.0.1:5000; 0.0.0.0 exposes it to the network)
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow 3's background job runner (GenAI jobs; default false here: unused
#                                 by this project and several extra processes on a small machine)
# Extra arguments are passed to `mlflow server` as they are.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
store="$here/store/server"   # under mlflow/store/ (git-ignored), apart from the local no-server store

# Prefer the project's virtual environment.
mlflow_bin="${MLFLOW_BIN:-}"
if [ -z "$mlflow_bin" ]; then
  if [ -x "$root/.venv/bin/mlflow" ]; then mlflow_bin="$root/.venv/bin/mlflow"; else mlflow_bin="mlflow"; fi
fi

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$store/mlflow.db}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
case "$backend" in sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;; esac

if [ -n "${MLFLOW_DEFAULT_ARTIFACT_ROOT:-}" ]; then
  artifacts=(--no-serve-artifacts --default-artifact-root "$MLFLOW_DEFAULT_ARTIFACT_ROOT")
  where="$MLFLOW_DEFAULT_ARTIFACT_ROOT (clients write directly)"
else
  dest="${MLFLOW_ARTIFACTS_DESTINATION:-$store/artifacts}"
  case "$dest" in *://*) ;; *) mkdir -p "$dest" ;; esac
  artifacts=(--serve-artifacts --artifacts-destination "$dest")
  where="$dest (proxied by the server)"
fi

echo "MLflow server: backend $backend, artifacts $where" >&2
echo "  export MLFLOW_TRACKING_URI=http://$([ "$host" = 0.0.0.0 ] && echo 127.0.0.1 || echo "$host"):$port" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "$backend" \
  "${artifacts[@]}" \
  --host "$host" --port "$port" \
  --workers "${MLFLOW_WORKERS:-2}" \
  "$@"
