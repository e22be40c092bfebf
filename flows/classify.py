"""Classification fine-tuning flow: check -> load -> tokenize -> loaders -> train -> evaluate -> log, register."""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import flow_run_name_for, mlflow_run, run_dir_for, sigterm_as_exception, summary_text
from flows.config import ClassifyConfig


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(run_id: str, run_dir: str, history: list[dict], label_names: list[str]) -> list[str]:
    """Confusion matrix of the final model, loss curve and metrics.json as run artifacts."""
    import json
    from pathlib import Path

    from tasks import tracking
    from tasks.evaluate import confusion_matrix_artifacts, loss_curve_artifact

    preds = json.loads((Path(run_dir) / "eval_predictions.json").read_text())
    paths = confusion_matrix_artifacts(preds["preds"], preds["labels"], label_names, Path(run_dir) / "eval")
    paths.append(loss_curve_artifact(history, Path(run_dir) / "eval"))
    paths.append(str(Path(run_dir) / "model" / "metrics.json"))
    paths.append(str(Path(run_dir) / "model" / "config.yaml"))
    tracking.log_artifacts(run_id, paths, "eval")
    return paths


@flow(name="classify-finetune", flow_run_name=flow_run_name_for(ClassifyConfig))
def classify_flow(config: ClassifyConfig = ClassifyConfig()) -> dict:
    """Fine-tune a BERT-family classifier, track it in MLflow and register it in the Model Registry."""
    from tasks import tracking
    from tasks.data import load_dataset_task
    from tasks.loaders import build_dataloaders_task
    from tasks.tokenize import check_model_task, tokenize_task
    from tasks.common import cached_path_result, run_logger
    from tasks.train_classifier import train_classifier_task

    from flows.monitoring import MonitoredMetrics, summary_artifact, train_task_run_name
    from flows.promotion import resolve_metric

    cfg = config
    logger = run_logger(__name__)
    # Cheap checks first: tracking store reachable, model loadable, max_length within its limit.
    uri = tracking.check_tracking_server()
    check_model_task(cfg.train.model, cfg.data.max_length)
    resolve_metric(cfg)  # an unknown --promotion-metric fails here, not after training
    data = cached_path_result(load_dataset_task, cfg.data, cfg.train.seed, cfg.num_labels, path_of=lambda d: d.path)
    logger.info("data: %d train / %d eval examples, labels %s", data.num_train, data.num_eval, data.label_names)
    tokenized = cached_path_result(tokenize_task, data.path, cfg.train.model, cfg.data.max_length,
                                   cfg.data.pad_to_max_length)

    with sigterm_as_exception(), mlflow_run(cfg) as run_id:
        run_dir = run_dir_for(cfg, run_id)
        tracking.set_tags(run_id, {"num_labels": data.num_labels, "label_names": ",".join(data.label_names)})
        loaders = build_dataloaders_task(
            tokenized, cfg.train.model, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.seed,
            cfg.data.pad_to_max_length,
        )
        on_metrics = MonitoredMetrics(tracking.MetricsLogger(run_id), cfg.train.epochs, key=cfg.registered_model,
                                      label=f"{cfg.registered_model} ({cfg.engine})")
        result = train_classifier_task.with_options(task_run_name=train_task_run_name)(
            cfg, data, tokenized, str(run_dir), loaders=loaders, on_metrics=on_metrics
        )
        tracking.log_device(run_id, result.device)
        log_evaluation(run_id, str(run_dir), result.history, data.label_names)
        from flows.lifecycle import publish_model

        outcome = publish_model(
            cfg, run_id, result.model_dir, "text-classification", result.final,
            input_example=["This movie was great!"], eval_data=data.path,
        )
    metrics = {k: v for k, v in result.final.items() if k != "epoch"}
    summary_artifact("classify", cfg.registered_model, run_id, metrics, outcome, uri)
    print(summary_text("classify", metrics, run_id, cfg.registered_model, outcome.get("version"),
                       outcome.get("aliases", []), outcome["predict_cmd"], outcome.get("decision")))
    return {"run_id": run_id, "tracking_uri": uri, "metrics": metrics, **outcome, "history": result.history}
