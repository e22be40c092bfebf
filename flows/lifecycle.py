"""The tail of every training run, one path from a config to a registered model: train, log (device, selection,
evaluation artifacts, the model in the transformers flavor with an input example in the model's own mask token),
retention (a finished run's checkpoints go), publish (register a new version and decide aliases). The training
flow runs it whole; a sweep trial runs it without publishing (its run is nested under the sweep's, and only the
best trial is registered, by the sweep).

Publishing: a new version that beats the job's trivial baseline on the same eval data (the quality floor), with
finite metrics and a good smoke prediction, becomes `challenger`; the champion/challenger comparison
(tasks/promotion.py) then moves `champion` to it when it wins (or there is no champion yet). A version below the
floor gets no alias (tagged with the reason): `challenger` keeps pointing at the last candidate above it. With
--no-promote a version above the floor stays challenger."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import NamedTuple

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import JobConfig
from flows.manage import publish_compare_artifact
from flows.monitoring import MonitoredMetrics, register_task_run_name, train_task_run_name
from flows.promotion import champion_challenger
from tasks import registry, tracking
from tasks.common import run_logger
from tasks.disk import human_bytes, prune_run_dir
from tasks.evaluate import loss_curve_artifact
from tasks.locks import registry_lock
from tasks.prefect_tasks import log_model_task
from tasks.training import STEP_LOSS, TrainResult, train_task


def predict_command(name: str, alias: str | None = None, version: str | None = None, example: str = "This movie was great!") -> str:
    """The `finetune predict` line for a version, with an example text (quoted for the shell)."""
    sel = f"--version {version}" if version else f"--alias {alias or 'champion'}"
    return f"finetune predict --registered-model {name} {sel} {shlex.quote(example)}"


def example_text(data_path: str | None, recipe, max_words: int = 16) -> str:
    """A text from the run's own eval split for the predict hint (the recipe's smoke example when there is none):
    the first eval text of at least 3 words, its first sentence when that is short enough, else its first
    `max_words` words, made into the job's input by its `example_from` hook (MLM masks a word)."""
    try:
        from datasets import load_from_disk  # datasets loads pyarrow: only for the summary's example

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


def input_example(recipe, model_dir: str) -> list[str]:
    """The logged model's input example: the job's smoke example, `[MASK]` written as the model's own mask token
    (`<mask>` for RoBERTa)."""
    return [recipe.smoke_example.replace("[MASK]", _mask_token(model_dir))]


def _mask_token(model_dir: str) -> str:
    """The model's own mask token (`[MASK]` for BERT, `<mask>` for RoBERTa), for the logged input example."""
    from transformers import AutoTokenizer  # transformers pulls in torch: only when a model is logged

    return AutoTokenizer.from_pretrained(model_dir).mask_token or "[MASK]"


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(run_id: str, run_dir: str, model_dir: str, history: list[dict], spec,
                   steps_per_epoch: int | None = None) -> tuple[list[str], str]:
    """The job's own artifacts (confusion matrix, fill-mask examples...), the loss curve (per-epoch losses and the
    run's train_loss_step series, read back from MLflow so a resumed run's curve is whole), metrics.json and the
    resolved config, under `eval/` in the run. Returns the paths and a text for the summary."""
    recipe = spec.recipe
    extras_file = Path(run_dir) / "eval_extras.json"
    extras = json.loads(extras_file.read_text()) if extras_file.exists() else {}
    paths, text = recipe.artifacts(run_dir, model_dir, extras, spec) if recipe.artifacts else ([], "")
    steps = sorted((m.step, m.value) for m in tracking.client().get_metric_history(run_id, STEP_LOSS))
    paths = [*paths, loss_curve_artifact(history, Path(run_dir) / "eval", steps, steps_per_epoch),
             str(Path(model_dir) / "metrics.json"), str(Path(model_dir) / "config.yaml")]
    tracking.log_artifacts(run_id, paths, "eval")
    return paths, text


def selection_tags(result) -> dict:
    """Which epoch's weights the run logged and registered (its metrics are the run's final ones), the best epoch
    by the selection metric, and where early stopping ended training. Tags, not params: a resumed run sets them."""
    tags = {"selected_epoch": result.selected_epoch, "best_epoch": result.best_epoch,
            "selection_metric": result.selection_metric, "stopped_early_at": result.stopped_early_at}
    return {k: v for k, v in tags.items() if v is not None}


class Trained(NamedTuple):
    result: TrainResult
    model_uri: str          # the model logged to the run (models:/m-...)
    outcome: dict           # publish_model's (version, aliases, decision, ...); {} when not published
    text: str               # the job's artifacts' text for the summary
    model_dir: str | None   # the run's model copy; None once retention removed it


def train_log_publish(cfg: JobConfig, spec, run_id: str, run_dir: str | Path, tokenized_path: str,
                      data_path: str | None = None, *, loaders: dict | None = None, publish: bool = True,
                      progress: bool = True, on_evaluation=None) -> Trained:
    """One path from a config to a registered model, inside the run `run_id`: train -> log (device, selection tags,
    evaluation artifacts, the model) -> retention (unless `train.keep_checkpoints`, the finished run's checkpoints
    and model copy go: it is logged, nothing can resume it) -> publish (register and promote, `publish_model`).
    A sweep trial passes `publish=False` (the sweep registers its best trial) and `progress=False` (no per-run
    Prefect progress cards: trials run side by side) and may pass `on_evaluation` (its pruner's hook, which stops
    the run by raising). A failure raises before retention: a failed run keeps its checkpoints for --resume and the
    Prefect retry."""
    recipe = spec.recipe
    mlflow_metrics = tracking.MetricsLogger(run_id)
    on_metrics = (MonitoredMetrics(mlflow_metrics, cfg.train.epochs, key=cfg.registered_model,
                                   label=f"{cfg.registered_model} ({cfg.engine})") if progress else mlflow_metrics)
    result = train_task.with_options(task_run_name=train_task_run_name)(
        spec, tokenized_path, str(run_dir), loaders=loaders, on_metrics=on_metrics, on_step=mlflow_metrics,
        on_evaluation=on_evaluation)
    tracking.log_device(run_id, result.device)
    tracking.set_tags(run_id, selection_tags(result))
    tracking.log_params_once(run_id, {"trainable_parameters": result.trainable_parameters})
    if result.train_samples_per_second:
        mlflow_metrics({"train_samples_per_second": result.train_samples_per_second}, cfg.train.epochs)
    _, text = log_evaluation(run_id, str(run_dir), result.model_dir, result.history, spec, result.steps_per_epoch)
    model_uri = log_model_task(run_id, result.model_dir, recipe.hf_task, input_example(recipe, result.model_dir))
    outcome = publish_model(cfg, run_id, model_uri, result.final, data_path=data_path, tokenized_path=tokenized_path,
                            history=result.history, probe=result.probe) if publish else {}
    model_dir: str | None = result.model_dir
    if not cfg.train.keep_checkpoints:
        run_logger(__name__).info("removed the finished run's checkpoints and model copy from %s (%s; "
                                  "--keep-checkpoints keeps them)", run_dir, human_bytes(prune_run_dir(run_dir)))
        model_dir = None
    return Trained(result, model_uri, outcome, text, model_dir)


@task(name="register-and-promote", cache_policy=NO_CACHE, task_run_name=register_task_run_name)
def register_and_promote(cfg: JobConfig, run_id: str, model_uri: str, final: dict, data_path: str | None = None,
                         tokenized_path: str | None = None, history: list[dict] | None = None,
                         probe: dict[str, float] | None = None) -> dict:
    """New version -> alias `challenger` -> champion/challenger (unless --no-promote). `data_path` and
    `tokenized_path` are the prepared and tokenized datasets the run trained on: champion and challenger are scored
    on their eval split by the job's own evaluation; `history` (the run's per-epoch metrics) and `data_path` feed
    the job's trivial baseline, which the challenger must beat to become champion."""
    name = cfg.registered_model
    # One registry change per model at a time: two retraining runs cannot interleave their promotions.
    with registry_lock(name):
        version = registry.register_model(model_uri, name, run_id, tags={"job": cfg.job})
        tracking.set_tags(run_id, {"registered_model": name, "registered_version": version})
        # the quality floor first (every version, --no-promote too): only one above it gets an alias
        promotion = champion_challenger(cfg, name, version, data_path=data_path, tokenized_path=tokenized_path,
                                        run_final=final, run_history=history, probe=probe,
                                        promote=cfg.tracking.promote)
        decision = promotion["decision"]
        tracking.set_tags(run_id, {"promotion.decision": decision[:5000]})
        aliases = [a for a, v in registry.aliases(name).items() if v == version]
    # Every registration refreshes the versions table artifact (same table as `finetune compare`).
    publish_compare_artifact(name)
    return {"version": version, "aliases": sorted(aliases), "decision": decision,
            "promoted": bool(promotion.get("promoted")), "promotion": promotion}


def publish_model(cfg: JobConfig, run_id: str, model_uri: str, final: dict, data_path: str | None = None,
                  tokenized_path: str | None = None, history: list[dict] | None = None,
                  probe: dict[str, float] | None = None) -> dict:
    """Register the run's logged model (`model_uri`), set aliases; returns version, aliases, model URIs and the
    predict command."""
    out = register_and_promote(cfg, run_id, model_uri, final, data_path, tokenized_path, history, probe)
    alias = "champion" if "champion" in out["aliases"] else None
    out.update(
        logged_model_uri=model_uri,
        model_uri=f"models:/{cfg.registered_model}/{out['version']}",
        predict_cmd=predict_command(cfg.registered_model, alias, None if alias else out["version"],
                                    example_text(data_path, cfg.recipe)),
    )
    return out
