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
#   MLFLOW_BACKEND_STORE_URI      runs + registry database     (default sqlite:///mlflow/store/server/mlflow.db);
#                                 PostgreSQL: postgresql://user:pw@host:5432/db (the `postgres` extra: psycopg2);
#                                 the database must exist, MLflow creates its tables on the first start
#   MLFLOW_ARTIFACTS_DESTINATION  where the server keeps artifacts; clients upload through the server
#                                 (mlflow-artifacts:/), so they need no access to it (default mlflow/store/server/artifacts)
#   MLFLOW_DEFAULT_ARTIFACT_ROOT  instead: an artifact root clients write to directly (shared disk, s3://...);
#                                 turns artifact proxying off
#   MLFLOW_HOST / MLFLOW_PORT     bind address (default 127.0.0.1:5000; 0.0.0.0 exposes it to the network)
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow 3's background job runner (GenAI jobs; default false here: unused
#                                 by this project and several extra processes on a small machine)
#   MLFLOW_SERVER_DIR             the server's own files: default sqlite store, artifacts, auth database and the
#                                 generated auth config (default mlflow/store/server, git-ignored)
# Authentication (MLflow's basic-auth app, the `auth` extra: pip install -e ".[auth]"; scripts/setup.sh does):
#   MLFLOW_AUTH=basic             turn it on (default: off, which is only safe on loopback)
#   MLFLOW_AUTH_ADMIN_USERNAME    admin user created on first start (default admin)
#   MLFLOW_AUTH_ADMIN_PASSWORD    its password, or MLFLOW_AUTH_ADMIN_PASSWORD_FILE: a file holding it. Required:
#                                 there is no default password. Used once, when the admin user is created.
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a user may do without an explicit grant: READ (default), NO_PERMISSIONS,
#                                 EDIT, MANAGE (see `finetune access`)
#   MLFLOW_AUTH_DATABASE_URI      users and permissions (default sqlite:///$MLFLOW_SERVER_DIR/basic_auth.db;
#                                 postgresql://... works too, best a database of its own)
#   MLFLOW_AUTH_CONFIG_PATH       your own basic_auth.ini, used as it is; unset: one is generated (mode 600) in
#                                 MLFLOW_SERVER_DIR from the settings above
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the auth app (default: a random one per start)
# Extra arguments are passed to `mlflow server` as they are.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# under mlflow/store/ (git-ignored), apart from the local no-server store
store="${MLFLOW_SERVER_DIR:-$here/store/server}"

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

die() { echo "error: $*" >&2; exit 2; }
redact() { sed -E 's#(://[^:/@]+):[^@/]*@#\1:***@#'; }   # user:password@ in a URI -> user:***@
py="$(dirname "$mlflow_bin")/python"
# A database URI needs its SQLAlchemy driver in the server's Python (SQLAlchemy 2.1 reads postgresql:// as
# psycopg 3, 2.0 as psycopg2): SQLAlchemy itself says which, and it is checked before starting.
need_driver() {  # $1: database URI, $2: the setting it came from
  case "$1" in
    sqlite:*) return 0 ;;
    postgres://*) die "$2: SQLAlchemy does not know the scheme postgres://; write $(printf %s "postgresql://${1#postgres://}" | redact)" ;;
  esac
  [ -x "$py" ] || return 0
  local missing
  missing="$(DB_URI="$1" "$py" -c '
import os
from sqlalchemy.engine import make_url
try:
    make_url(os.environ["DB_URI"]).get_dialect().import_dbapi()
except ImportError as e:
    print(e.name or e)
except Exception:
    pass  # not a driver problem: mlflow server reports it
' 2>/dev/null)" || true
  [ -z "$missing" ] || case "$1" in
    postgresql*) die "$2=$(printf %s "$1" | redact) needs the PostgreSQL driver $missing: .venv/bin/pip install -e '.[postgres]' (or bash scripts/setup.sh)" ;;
    *) die "$2=$(printf %s "$1" | redact) needs the database driver $missing: pip install it into the server's environment" ;;
  esac
}
need_driver "$backend" MLFLOW_BACKEND_STORE_URI

# --- authentication -------------------------------------------------------------------------------------------
auth_mode="${MLFLOW_AUTH:-}"
case "$auth_mode" in
  ""|none|off|false|0) auth_mode=none ;;
  basic|basic-auth) auth_mode=basic ;;
  *) die "MLFLOW_AUTH=$auth_mode: use MLFLOW_AUTH=basic (MLflow's basic-auth app) or leave it unset" ;;
esac
for a in "$@"; do case "$a" in --app-name|--app-name=*) auth_mode=app ;; esac; done   # the caller chose an app
app=()
if [ "$auth_mode" = basic ]; then
  [ ! -x "$py" ] || "$py" -c "import flask_wtf" 2>/dev/null \
    || die "MLFLOW_AUTH=basic needs MLflow's auth extra: .venv/bin/pip install -e '.[auth]' (or bash scripts/setup.sh)"
  admin_user="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
  admin_password="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
  if [ -z "$admin_password" ] && [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-}" ]; then
    [ -r "$MLFLOW_AUTH_ADMIN_PASSWORD_FILE" ] || die "MLFLOW_AUTH_ADMIN_PASSWORD_FILE=$MLFLOW_AUTH_ADMIN_PASSWORD_FILE is not a readable file"
    admin_password="$(head -n 1 "$MLFLOW_AUTH_ADMIN_PASSWORD_FILE" | tr -d '\r\n')"
  fi
  umask 077   # everything written from here on (auth config, auth database) is owner-only
  mkdir -p "$store"
  if [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then   # the operator's own config, used as it is
    [ -r "$MLFLOW_AUTH_CONFIG_PATH" ] || die "MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH is not a readable file"
    if [ -z "$admin_password" ] && ! grep -Eq '^[[:space:]]*admin_password[[:space:]]*=[[:space:]]*[^[:space:]]' "$MLFLOW_AUTH_CONFIG_PATH"; then
      die "MLFLOW_AUTH=basic needs an admin password: set MLFLOW_AUTH_ADMIN_PASSWORD or MLFLOW_AUTH_ADMIN_PASSWORD_FILE (there is no default)"
    fi
    case "$(stat -c %a "$MLFLOW_AUTH_CONFIG_PATH" 2>/dev/null || echo 600)" in
      ?00) ;; *) echo "warning: $MLFLOW_AUTH_CONFIG_PATH is readable by other users: chmod 600 it" >&2 ;;
    esac
    [ -z "$admin_password" ] || export MLFLOW_AUTH_ADMIN_PASSWORD="$admin_password"   # (from the file)
    [ -n "${MLFLOW_AUTH_ADMIN_USERNAME:-}" ] || unset MLFLOW_AUTH_ADMIN_USERNAME
  else
    [ -n "$admin_password" ] || die "MLFLOW_AUTH=basic needs an admin password: set MLFLOW_AUTH_ADMIN_PASSWORD or MLFLOW_AUTH_ADMIN_PASSWORD_FILE (there is no default)"
    case "$admin_password$admin_user" in *$'\n'*) die "the admin user name and password may not contain a newline" ;; esac
    auth_db="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$store/basic_auth.db}"
    need_driver "$auth_db" MLFLOW_AUTH_DATABASE_URI
    case "$auth_db" in sqlite:///*) mkdir -p "$(dirname "${auth_db#sqlite:///}")" ;; esac
    ini="$store/basic_auth.ini"
    case "$ini" in "$root"/*) git -C "$root" check-ignore -q "$ini" 2>/dev/null \
      || echo "warning: $ini is inside the repository and not git-ignored: do not commit it" >&2 ;; esac
    rm -f "$ini.tmp"
    # '%' is doubled for configparser's interpolation (a database URI or a password may hold one)
    printf '[mlflow]\ndefault_permission = %s\ndatabase_uri = %s\nadmin_username = %s\nadmin_password = %s\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
      "${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}" "${auth_db//%/%%}" "${admin_user//%/%%}" "${admin_password//%/%%}" > "$ini.tmp"
    chmod 600 "$ini.tmp" && mv -f "$ini.tmp" "$ini"
    export MLFLOW_AUTH_CONFIG_PATH="$ini"
    # the config is the one source of the admin credentials: not in the server's environment (MLflow would let a
    # set-but-empty variable override the file)
    unset MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_ADMIN_USERNAME
    echo "auth: basic (admin user $admin_user; config $ini, mode 600; users and permissions in $(printf %s "$auth_db" | redact))" >&2
  fi
  unset MLFLOW_AUTH_ADMIN_PASSWORD_FILE admin_password
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then   # CSRF key, the same in every worker of this start
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  app=(--app-name basic-auth)
fi
case "$host" in
  127.*|localhost|::1|"[::1]") ;;
  *) if [ "$auth_mode" = none ]; then
       echo "WARNING: binding to $host without authentication: anyone who can reach port $port can read, change and" \
            "delete runs, artifacts and registered models, and move the champion alias that serving and" \
            "\`finetune predict\` use. Set MLFLOW_AUTH=basic (see mlflow/README.md) or bind to 127.0.0.1." >&2
     fi ;;
esac

echo "MLflow server: backend $(printf %s "$backend" | redact), artifacts $where" >&2
echo "  export MLFLOW_TRACKING_URI=http://$([ "$host" = 0.0.0.0 ] && echo 127.0.0.1 || echo "$host"):$port" >&2
if [ "$auth_mode" = basic ]; then echo "  export MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>" >&2; fi
exec "$mlflow_bin" server \
  --backend-store-uri "$backend" \
  "${artifacts[@]}" \
  --host "$host" --port "$port" \
  --workers "${MLFLOW_WORKERS:-2}" \
  "${app[@]}" \
  "$@"
