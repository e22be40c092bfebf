"""The tail of every training flow: log the model (transformers flavor), register a new version, and decide
aliases. Every new version becomes `challenger`; the champion/challenger comparison (flows/promotion.py) then
moves `champion` to it when it wins, or when there is no champion yet and it passes evaluation and a smoke
prediction. With --no-promote it stays challenger."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import JobConfig
from flows.monitoring import register_task_run_name


def predict_command(name: str, alias: str | None = None, version: str | None = None, example: str = "This movie was great!") -> str:
    sel = f"--version {version}" if version else f"--alias {alias or 'champion'}"
    return f'finetune predict --registered-model {name} {sel} "{example}"'


@task(name="register-and-promote", cache_policy=NO_CACHE, task_run_name=register_task_run_name)
def register_and_promote(cfg: JobConfig, run_id: str, model_uri: str, final: dict, eval_data: str | None = None) -> dict:
    """New version -> alias `challenger` -> champion/challenger (unless --no-promote). `eval_data` is the prepared
    dataset dir the run trained on: champion and challenger are scored on its eval split."""
    from tasks import registry, tracking
    from tasks.locks import registry_lock

    name = cfg.registered_model
    # One registry change per model at a time: two retraining runs cannot interleave their promotions.
    with registry_lock(name):
        version = registry.register_model(model_uri, name, run_id, tags={"job": cfg.job})
        tracking.set_tags(run_id, {"registered_model": name, "registered_version": version})
        registry.set_alias(name, registry.CHALLENGER, version)
        promotion: dict = {}
        if cfg.tracking.promote:
            from flows.promotion import champion_challenger

            promotion = champion_challenger(cfg, name, version, eval_data=eval_data)
            decision = promotion["decision"]
        else:
            decision = f"version {version} registered as challenger; promotion skipped (--no-promote)"
        tracking.set_tags(run_id, {"promotion.decision": decision[:5000]})
        aliases = [a for a, v in registry.aliases(name).items() if v == version]
    # Every registration refreshes the versions table artifact (same table as `finetune compare`).
    from flows.manage import publish_compare_artifact

    publish_compare_artifact(name)
    return {"version": version, "aliases": sorted(aliases), "decision": decision,
            "promoted": bool(promotion.get("promoted")), "promotion": promotion}


def publish_model(cfg: JobConfig, run_id: str, model_dir: str, hf_task: str, final: dict, input_example=None,
                  eval_data: str | None = None) -> dict:
    """Log the model to the run, register it, set aliases; returns version, aliases, model URI, predict command.
    `eval_data`: the prepared dataset dir (PreparedData.path) for the champion/challenger comparison."""
    from tasks.tracking import log_model_task

    model_uri = log_model_task(run_id, model_dir, hf_task, input_example)
    out = register_and_promote(cfg, run_id, model_uri, final, eval_data)
    alias = "champion" if "champion" in out["aliases"] else None
    example = "This is a [MASK] movie!" if hf_task == "fill-mask" else "This movie was great!"
    out.update(
        logged_model_uri=model_uri,
        model_uri=f"models:/{cfg.registered_model}/{out['version']}",
        predict_cmd=predict_command(cfg.registered_model, alias, None if alias else out["version"], example),
    )
    return out
