"""Masked-LM fine-tuning flow: check -> load -> tokenize + group -> (loaders) -> train -> log, register.
Training runs through TRL's SFTTrainer with the masked-LM objective (`--engine sft`) or a plain PyTorch loop
(`--engine manual`) on the same blocks, collator and fixed-mask eval split, so the two compare in MLflow."""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import flow_run_name_for, mlflow_run, run_dir_for, sigterm_as_exception, summary_text
from flows.config import MLMConfig

EXAMPLE = "This is a [MASK] movie!"


@task(name="fill-mask-examples", cache_policy=NO_CACHE)
def fill_mask_examples(model_dir: str, texts: list[str], top_k: int, out_dir: str) -> tuple[str, str]:
    """Top-k candidates of the trained model (local checkpoint) on example texts: JSON for the run, text for the
    summary. `[MASK]` is mapped to the model's own mask token, as `finetune predict` does."""
    import json
    from pathlib import Path

    from transformers import pipeline

    from tasks.predict import fill_mask, format_predictions

    results = fill_mask(pipeline("fill-mask", model=model_dir, tokenizer=model_dir, device="cpu"), texts, top_k)
    path = Path(out_dir) / "fill_mask_examples.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return str(path), format_predictions(results)


@flow(name="mlm-finetune", flow_run_name=flow_run_name_for(MLMConfig))
def mlm_flow(config: MLMConfig = MLMConfig()) -> dict:
    """Fine-tune a masked language model, track it in MLflow and register it (fill-mask) in the Model Registry."""
    from pathlib import Path

    from tasks import tracking
    from tasks.data import load_dataset_task
    from tasks.evaluate import loss_curve_artifact
    from tasks.loaders import build_dataloaders_task
    from tasks.mlm_data import mlm_collator_for, mlm_stats, tokenize_mlm_task
    from tasks.tokenize import check_model_task
    from tasks.common import cached_path_result, run_logger
    from tasks.train_mlm import train_mlm_task

    from flows.monitoring import MonitoredMetrics, summary_artifact, train_task_run_name
    from flows.promotion import resolve_metric

    cfg = config
    logger = run_logger(__name__)
    # Cheap checks first: tracking store reachable, model loadable with a mask token and an MLM head class.
    uri = tracking.check_tracking_server()
    info = check_model_task(cfg.train.model, cfg.data.max_length, masked_lm=True)
    resolve_metric(cfg)  # an unknown --promotion-metric fails here, not after training
    if not info["has_mlm_head"]:
        logger.warning(
            "model %r ships no masked-LM head: its prediction head (cls.predictions.*) is newly initialised, so "
            "fill-mask output is noise until it is fine-tuned; expect a high epoch-0 loss. A checkpoint trained "
            "for MLM (e.g. bert-base-uncased) starts from a working head.", cfg.train.model,
        )
    data = cached_path_result(load_dataset_task, cfg.data, cfg.train.seed, path_of=lambda d: d.path)
    tokenized = cached_path_result(
        tokenize_mlm_task, data.path, cfg.train.model, cfg.data.max_length, cfg.group_texts, cfg.mlm_probability,
        cfg.train.seed,
    )
    stats = mlm_stats(tokenized)
    logger.info(
        "data: %d train / %d eval texts -> %d train / %d eval blocks of up to %d tokens (%d masked eval tokens)",
        data.num_train, data.num_eval, stats["train_blocks"], stats["eval_blocks"], cfg.data.max_length,
        stats["eval_masked_tokens"],
    )

    with sigterm_as_exception(), mlflow_run(cfg) as run_id:
        run_dir = run_dir_for(cfg, run_id)
        c = tracking.client()
        logged = c.get_run(run_id).data.params
        for k, v in {f"data.{k}": v for k, v in stats.items() if k not in ("group_texts", "max_length")}.items():
            if k not in logged:  # a resumed run already has them
                c.log_param(run_id, k, v)
        tracking.set_tags(run_id, {
            "mlm_head": "pretrained" if info["has_mlm_head"] else "newly initialised",
            "mask_token": info["mask_token"],
        })
        loaders = None
        if cfg.engine == "manual":
            loaders = build_dataloaders_task(
                tokenized, cfg.train.model, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.seed,
                collator=mlm_collator_for(cfg.train.model, cfg.mlm_probability, cfg.train.seed),
            )
        mlflow_metrics = tracking.MetricsLogger(run_id)
        on_metrics = MonitoredMetrics(mlflow_metrics, cfg.train.epochs, key=cfg.registered_model,
                                      label=f"{cfg.registered_model} ({cfg.engine})")
        result = train_mlm_task.with_options(task_run_name=train_task_run_name)(
            cfg, tokenized, str(run_dir), loaders=loaders, on_metrics=on_metrics
        )
        tracking.log_device(run_id, result.device)
        if result.train_samples_per_second:
            mlflow_metrics({"train_samples_per_second": result.train_samples_per_second}, cfg.train.epochs)

        examples_json, examples_text = fill_mask_examples(result.model_dir, [EXAMPLE], cfg.top_k, str(Path(run_dir) / "eval"))
        tracking.log_artifacts(run_id, [
            loss_curve_artifact(result.history, Path(run_dir) / "eval"),
            examples_json,
            str(Path(result.model_dir) / "metrics.json"),
            str(Path(result.model_dir) / "config.yaml"),
        ], "eval")
        from flows.lifecycle import publish_model

        outcome = publish_model(
            cfg, run_id, result.model_dir, "fill-mask", result.final,
            input_example=[EXAMPLE.replace("[MASK]", info["mask_token"])], eval_data=data.path,
        )
    first = result.history[0]
    metrics = {k: v for k, v in result.final.items() if k != "epoch"}
    metrics.update({f"epoch0_{k}": v for k, v in first.items() if k != "epoch"})
    summary_artifact("mlm", cfg.registered_model, run_id, metrics, outcome, uri)
    print(summary_text("mlm", metrics, run_id, cfg.registered_model, outcome.get("version"),
                       outcome.get("aliases", []), outcome["predict_cmd"], outcome.get("decision")))
    print("fill-mask with the trained model:\n" + examples_text)
    return {"run_id": run_id, "tracking_uri": uri, "metrics": metrics, **outcome, "history": result.history,
            "device": result.device, "train_samples_per_second": result.train_samples_per_second}
