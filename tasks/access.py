"""Users and permissions on an MLflow tracking server that runs MLflow's basic-auth app
(`MLFLOW_AUTH=basic bash mlflow/server.sh`): `finetune access create-user` and `finetune access grant`.

Least privilege, per identity (see mlflow/README.md):
- training identity: EDIT on the experiment (create runs, log params, metrics, artifacts and the model) and
  MANAGE on the registered model (new versions, the `challenger`/`champion` aliases, and deleting an alias, which
  MLflow counts as a delete);
- serving identity: READ on the registered model and its experiment (the model's files), nothing else.

These calls are made as whoever MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD name: an admin, or a user
with MANAGE on the resource. Passwords are read from a file, an environment variable or a hidden prompt, never
from the command line (it would show in `ps` and in shell history)."""
from __future__ import annotations

import os
from typing import Literal

from tasks import tracking
from tasks.common import ConfigError
from tasks.tracking import access_denied, auth_status, display_uri, tracking_uri

Permission = Literal["READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"]
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


def _server() -> str:
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"`finetune access` manages users on an MLflow tracking server; MLFLOW_TRACKING_URI is "
                          f"{display_uri()}: point it at the server (e.g. http://127.0.0.1:5000)")
    return uri


def _auth_client():
    import warnings

    try:
        with warnings.catch_warnings():  # the server modules it imports warn about server-side deprecations
            warnings.simplefilter("ignore")
            from mlflow.server.auth.client import AuthServiceClient
    except ImportError as e:  # pragma: no cover - flask is an mlflow dependency
        raise ConfigError(f"MLflow's auth client is unavailable ({e}): pip install -e '.[auth]'") from None
    return AuthServiceClient(_server())


def _admin_error(e: Exception, what: str) -> Exception:
    """A refusal while managing access: who may do it, in one line."""
    if auth_status(e):
        return access_denied(e, "admin (or MANAGE on the resource)", what)
    code = getattr(e, "error_code", "")
    if code == "ENDPOINT_NOT_FOUND" or "404" in str(e):
        return ConfigError(f"the MLflow server at {display_uri()} has no user management: start it with "
                           "authentication (MLFLOW_AUTH=basic bash mlflow/server.sh)")
    return ConfigError(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def create_user(username: str, password: str) -> None:
    if not password:
        raise ConfigError("empty password: pass --password-file FILE or set MLFLOW_NEW_USER_PASSWORD")
    try:
        _auth_client().create_user(username, password)
    except ConfigError:
        raise
    except Exception as e:
        if getattr(e, "error_code", "") == "RESOURCE_ALREADY_EXISTS":
            raise ConfigError(f"MLflow user {username!r} already exists at {display_uri()}") from None
        raise _admin_error(e, f"creating user {username!r}") from None


def experiment_id(name: str, create: bool = True) -> str:
    """The id of experiment `name`, created (empty) when missing so that a grant has something to attach to."""
    c = tracking.client()
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if not create:
            raise ConfigError(f"experiment {name!r} not found at {display_uri()}")
        return c.create_experiment(name)
    except ConfigError:
        raise
    except Exception as e:
        raise _admin_error(e, f"experiment {name!r}") from None


def ensure_registered_model(name: str) -> None:
    c = tracking.client()
    try:
        c.get_registered_model(name)
    except Exception as e:
        if auth_status(e):
            raise _admin_error(e, f"registered model {name!r}") from None
        try:
            c.create_registered_model(name, description="Registered by finetune-flows.")
        except Exception as e2:
            if getattr(e2, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise _admin_error(e2, f"registered model {name!r}") from None


def grant(username: str, permission: str, *, registered_model: str | None = None,
          experiment: str | None = None) -> list[str]:
    """Grants `permission` to `username` on the registered model and/or the experiment (each created when
    missing). Returns one line per grant made."""
    permission = permission.upper()
    if permission not in PERMISSIONS:
        raise ConfigError(f"permission {permission!r}: use one of {', '.join(PERMISSIONS)}")
    if not registered_model and not experiment:
        raise ConfigError("nothing to grant on: pass --registered-model NAME and/or --experiment NAME")
    c = _auth_client()
    done = []
    targets = []
    if registered_model:
        ensure_registered_model(registered_model)
        targets.append(("registered_model", registered_model, f"registered model {registered_model!r}"))
    if experiment:
        targets.append(("experiment", experiment_id(experiment), f"experiment {experiment!r}"))
    for rtype, rid, label in targets:
        try:
            c.grant_user_permission(username, rtype, rid, permission)
        except Exception as e:
            raise _admin_error(e, f"granting {permission} on {label} to {username!r}") from None
        done.append(f"{username}: {permission} on {label}")
    return done


def password_from(file: str | None, env: str = "MLFLOW_NEW_USER_PASSWORD") -> str | None:
    """The first line of `file`, else the environment variable `env`, else None (the CLI prompts)."""
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"--password-file {file!r}: {e.strerror}") from None
    return os.environ.get(env) or None
