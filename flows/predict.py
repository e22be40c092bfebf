"""Prediction flow: load a registered model by alias or version and predict texts."""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import predict
from tasks.predict import format_predictions
from tasks.registry import model_uri


@task(name="predict", cache_policy=NO_CACHE)
def predict_task(model_uri: str, texts: list[str], top_k: int = 5) -> list[dict]:
    return predict.predict(model_uri, texts, top_k)


@flow(name="predict", flow_run_name="predict-{registered_model}")
def predict_flow(registered_model: str, texts: list[str], alias: str | None = None, version: int | None = None,
                 top_k: int = 5) -> list[dict]:
    uri = model_uri(registered_model, alias, version)
    results = predict_task(uri, texts, top_k)
    print(format_predictions(results))
    return results
