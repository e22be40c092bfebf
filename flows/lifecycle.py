"""The tail of every training flow: log the model (transformers flavor), register a new version, and decide
aliases. A new version that beats the job's trivial baseline on the same eval data (the quality floor), with
finite metrics and a good smoke prediction, becomes `challenger`; the champion/challenger comparison
(flows/promotion.py) then moves `champion` to it when it wins (or there is no champion yet). A version below the
floor gets no alias (tagged with the reason): `challenger` keeps pointing at the last candidate above it. With
--no-promote a version above the floor stays challenger."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import JobConfig
from flows.monitoring import register_task_run_name


def predict_command(name: str, alias: str | None = None, version: str | None = None, example: str = "This movie was great!") -> str:
    """The `finetune predict` line for a version, with an example text (quoted for the shell)."""
    import shlex

    sel = f"--version {version}" if version else f"--alias {alias or 'champion'}"
    return f"finetune predict --registered-model {name} {sel} {shlex.quote(example)}"


def example_text(data_path: str | None, recipe, max_words: int = 16) -> str:
    """A text from the run's own eval split for the predict hint (the recipe's smoke example when there is none):
    the first eval text of at least 3 words, its first sentence when that is short enough, else its first
    `max_words` words, made into the job's input by its `example_from` hook (MLM masks a word)."""
    import re

    try:
        from datasets import load_from_disk

        ev = load_from_disk(data_path)["eval"] if data_path else None
        texts = ev["text"][:50] if ev is not None else []
        # sentence pairs (tasks/kinds/): predict takes "TEXT ||| TEXT"
        pairs = ev["text_pair"][:50] if ev is not None and "text_pair" in ev.column_names else None
    except Exception:
        texts, pairs = [], None

    def shorten(text: str) -> str:
        words = str(text).split()
        sentence = re.split(r"(?<=[.!?])\s", " ".join(words), maxsplit=1)[0].split()
        return " ".join(sentence if 3 <= len(sentence) <= max_words else words[:max_words])

    for i, text in enumerate(texts):
        if len(str(text).split()) < 3:
            continue
        short = shorten(text)
        if pairs is not None:
            return f"{short} ||| {shorten(pairs[i])}"
        example = recipe.example_from(short) if recipe.example_from else short
        if example:
            return example
    return recipe.smoke_example


@task(name="register-and-promote", cache_policy=NO_CACHE, task_run_name=register_task_run_name)
def register_and_promote(cfg: JobConfig, run_id: str, model_uri: str, final: dict, data_path: str | None = None,
                         tokenized_path: str | None = None, history: list[dict] | None = None,
                         probe: dict[str, float] | None = None) -> dict:
    """New version -> alias `challenger` -> champion/challenger (unless --no-promote). `data_path` and
    `tokenized_path` are the prepared and tokenized datasets the run trained on: champion and challenger are scored
    on their eval split by the job's own evaluation; `history` (the run's per-epoch metrics) and `data_path` feed
    the job's trivial baseline, which the challenger must beat to become champion."""
    from tasks import registry, tracking
    from tasks.locks import registry_lock

    name = cfg.registered_model
    # One registry change per model at a time: two retraining runs cannot interleave their promotions.
    with registry_lock(name):
        version = registry.register_model(model_uri, name, run_id, tags={"job": cfg.job})
        tracking.set_tags(run_id, {"registered_model": name, "registered_version": version})
        from flows.promotion import champion_challenger

        # the quality floor first (every version, --no-promote too): only one above it gets an alias
        promotion = champion_challenger(cfg, name, version, data_path=data_path, tokenized_path=tokenized_path,
                                        run_final=final, run_history=history, probe=probe,
                                        promote=cfg.tracking.promote)
        decision = promotion["decision"]
        tracking.set_tags(run_id, {"promotion.decision": decision[:5000]})
        aliases = [a for a, v in registry.aliases(name).items() if v == version]
    # Every registration refreshes the versions table artifact (same table as `finetune compare`).
    from flows.manage import publish_compare_artifact

    publish_compare_artifact(name)
    return {"version": version, "aliases": sorted(aliases), "decision": decision,
            "promoted": bool(promotion.get("promoted")), "promotion": promotion}


def publish_model(cfg: JobConfig, run_id: str, model_dir: str, final: dict, data_path: str | None = None,
                  tokenized_path: str | None = None, history: list[dict] | None = None,
                  probe: dict[str, float] | None = None) -> dict:
    """Log the model to the run (the job's transformers task), register it, set aliases; returns version, aliases,
    model URI and the predict command."""
    from tasks.tracking import log_model_task

    recipe = cfg.recipe
    example = recipe.smoke_example
    model_uri = log_model_task(run_id, model_dir, recipe.hf_task, [example.replace("[MASK]", _mask_token(model_dir))])
    out = register_and_promote(cfg, run_id, model_uri, final, data_path, tokenized_path, history, probe)
    alias = "champion" if "champion" in out["aliases"] else None
    out.update(
        logged_model_uri=model_uri,
        model_uri=f"models:/{cfg.registered_model}/{out['version']}",
        predict_cmd=predict_command(cfg.registered_model, alias, None if alias else out["version"],
                                    example_text(data_path, recipe)),
    )
    return out


def _mask_token(model_dir: str) -> str:
    """The model's own mask token (`[MASK]` for BERT, `<mask>` for RoBERTa), for the logged input example."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).mask_token or "[MASK]"
