"""The tail of every training flow: log the model (transformers flavor), register a new version, and decide
aliases. The first version of a model becomes `champion`; later versions become `challenger` and are promoted
by the champion/challenger comparison when enabled."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import JobConfig


def predict_command(name: str, alias: str | None = None, version: str | None = None, example: str = "This movie was great!") -> str:
    sel = f"--version {version}" if version else f"--alias {alias or 'champion'}"
    return f'finetune predict --registered-model {name} {sel} "{example}"'


@task(name="register-and-promote", cache_policy=NO_CACHE)
def register_and_promote(cfg: JobConfig, run_id: str, model_uri: str, final: dict) -> dict:
    from tasks import registry, tracking

    name = cfg.registered_model
    version = registry.register_model(model_uri, name, run_id, tags={"job": cfg.job})
    tracking.set_tags(run_id, {"registered_model": name, "registered_version": version})
    aliases: list[str] = []
    decision = None
    if registry.alias_version(name, registry.CHAMPION) is None:
        registry.set_alias(name, registry.CHAMPION, version)
        aliases.append(registry.CHAMPION)
        decision = f"version {version} is the first champion"
    else:
        registry.set_alias(name, registry.CHALLENGER, version)
        aliases.append(registry.CHALLENGER)
        if cfg.tracking.promote:
            from flows.promotion import champion_challenger

            res = champion_challenger(cfg, name, version)
            decision = res["decision"]
            if res["promoted"]:
                aliases.append(registry.CHAMPION)
        else:
            decision = "promotion skipped (--no-promote)"
    return {"version": version, "aliases": aliases, "decision": decision}


def publish_model(cfg: JobConfig, run_id: str, model_dir: str, hf_task: str, final: dict, input_example=None) -> dict:
    """Log the model to the run, register it, set aliases; returns version, aliases, model URI, predict command."""
    from tasks.tracking import log_model_task

    model_uri = log_model_task(run_id, model_dir, hf_task, input_example)
    out = register_and_promote(cfg, run_id, model_uri, final)
    alias = "champion" if "champion" in out["aliases"] else None
    example = "This is a [MASK] movie!" if hf_task == "fill-mask" else "This movie was great!"
    out.update(
        logged_model_uri=model_uri,
        model_uri=f"models:/{cfg.registered_model}/{out['version']}",
        predict_cmd=predict_command(cfg.registered_model, alias, None if alias else out["version"], example),
    )
    return out
