"""MLflow Model Registry: register a logged model as a new version, aliases (champion, challenger), and the
promotion decision. Aliases, not the deprecated stages."""
from __future__ import annotations

import logging
import re
from typing import Any

from tasks.tracking import _retry, auth_status, client, on_model

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


def register_model(model_uri: str, name: str, run_id: str, tags: dict[str, Any] | None = None) -> str:
    """New version of `name` from the run's logged model; returns the version number (as a string)."""
    c = client()
    with on_model(name, "EDIT"):
        try:
            c.get_registered_model(name)
        except Exception as e:
            if auth_status(e):
                raise
            try:
                c.create_registered_model(name, description="Registered by finetune-flows.")
            except Exception as e2:  # created concurrently
                if auth_status(e2):
                    raise
        # A logged model's URI (models:/m-<id>) must travel with its model id: a tracking server rejects it otherwise.
        model_id = model_uri[len("models:/"):] if re.fullmatch(r"models:/m-[0-9a-f]+", model_uri) else None
        mv = _retry(
            c.create_model_version, name, model_uri, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()},
            model_id=model_id, attempts=3,
        )
    return str(mv.version)


def _missing(e: Exception) -> None:
    """In the lookups below "not found" means None/[]/{}; a refusal by the server (401/403) is raised, never
    mistaken for "not there"."""
    if auth_status(e):
        raise e


def alias_version(name: str, alias: str) -> str | None:
    with on_model(name, "READ"):
        try:
            return str(client().get_model_version_by_alias(name, alias).version)
        except Exception as e:
            _missing(e)
            return None


def set_alias(name: str, alias: str, version: str) -> None:
    with on_model(name, "EDIT"):
        _retry(client().set_registered_model_alias, name, alias, str(version), attempts=3)


def model_uri(name: str, alias: str | None = None, version: str | int | None = None) -> str:
    if version is not None:
        return f"models:/{name}/{version}"
    return f"models:/{name}@{alias or CHAMPION}"


# --- lifecycle helpers: versions, aliases, tags -------------------------------------------------------------
# Champion history is kept on the versions themselves: when a version becomes champion it gets the tag
# `finetune.replaced_version` (the champion it replaced), and the alias `previous-champion` always points there.
# Rollback walks that chain back one step.
REPLACED_TAG = "finetune.replaced_version"


def delete_alias(name: str, alias: str) -> None:
    with on_model(name, "MANAGE"):  # MLflow's basic-auth app: deleting an alias is a delete (MANAGE)
        try:
            client().delete_registered_model_alias(name, alias)
        except Exception as e:  # not set: nothing to delete
            _missing(e)


def get_version(name: str, version: str | int):
    """The ModelVersion (tags, run_id, source), or None when the model or version does not exist."""
    with on_model(name, "READ"):
        try:
            return client().get_model_version(name, str(version))
        except Exception as e:
            _missing(e)
            return None


def set_version_tags(name: str, version: str | int, tags: dict[str, Any]) -> None:
    c = client()
    with on_model(name, "EDIT"):
        for k, v in tags.items():
            _retry(c.set_model_version_tag, name, str(version), k, str(v), attempts=3)


def list_versions(name: str) -> list:
    """All versions of `name`, newest first ([] when the model is not registered)."""
    c = client()
    with on_model(name, "READ"):
        try:
            versions = c.search_model_versions(f"name = '{name}'", max_results=1000)
        except Exception as e:
            _missing(e)
            return []
    return sorted(versions, key=lambda mv: -int(mv.version))


def aliases(name: str) -> dict[str, str]:
    """alias -> version for a registered model ({} when it does not exist)."""
    with on_model(name, "READ"):
        try:
            return {a: str(v) for a, v in client().get_registered_model(name).aliases.items()}
        except Exception as e:
            _missing(e)
            return {}


def move_champion(name: str, version: str | int, reason: str) -> str | None:
    """Make `version` the champion; the replaced champion becomes `previous-champion`. Returns the replaced
    version (None when there was no champion, or it already was this version)."""
    version = str(version)
    old = alias_version(name, CHAMPION)
    if old == version:
        return None
    set_alias(name, CHAMPION, version)
    tags: dict[str, Any] = {"finetune.champion_reason": reason}
    if old is not None:
        set_alias(name, PREVIOUS, old)
        tags[REPLACED_TAG] = old
    set_version_tags(name, version, tags)
    if alias_version(name, CHALLENGER) == version:  # the challenger won: it holds `champion` now
        delete_alias(name, CHALLENGER)
    return old


def rollback_champion(name: str) -> tuple[str, str]:
    """Champion back to the version it replaced; returns (from_version, to_version). Raises LookupError when
    there is no champion or nothing to roll back to."""
    current = alias_version(name, CHAMPION)
    if current is None:
        raise LookupError(f"{name} has no champion")
    mv = get_version(name, current)
    target = (mv.tags or {}).get(REPLACED_TAG) if mv else None
    target = target or alias_version(name, PREVIOUS)
    if not target or target == current:
        raise LookupError(f"{name} champion version {current} did not replace another version: nothing to roll back to")
    if get_version(name, target) is None:
        raise LookupError(f"{name} version {target} (replaced by {current}) no longer exists")
    set_alias(name, CHAMPION, target)
    set_version_tags(name, current, {"finetune.rolled_back": "true"})
    # Keep the invariant: previous-champion is what the (new) champion replaced, if anything.
    before = (get_version(name, target).tags or {}).get(REPLACED_TAG)
    if before and before != target and get_version(name, before) is not None:
        set_alias(name, PREVIOUS, before)
    else:
        delete_alias(name, PREVIOUS)
    return current, target
