"""MLflow Model Registry: register a logged model as a new version, aliases (champion, challenger), and the
promotion decision. Aliases, not the deprecated stages."""
from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import _retry, client

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


def register_model(model_uri: str, name: str, run_id: str, tags: dict[str, Any] | None = None) -> str:
    """New version of `name` from the run's logged model; returns the version number (as a string)."""
    c = client()
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, description="Registered by finetune-flows.")
        except Exception:  # created concurrently
            pass
    mv = _retry(
        c.create_model_version, name, model_uri, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()},
        attempts=3,
    )
    return str(mv.version)


def alias_version(name: str, alias: str) -> str | None:
    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    _retry(client().set_registered_model_alias, name, alias, str(version), attempts=3)


def model_uri(name: str, alias: str | None = None, version: str | int | None = None) -> str:
    if version is not None:
        return f"models:/{name}/{version}"
    return f"models:/{name}@{alias or CHAMPION}"


register_model_task = task(register_model, name="register-model", cache_policy=NO_CACHE)
