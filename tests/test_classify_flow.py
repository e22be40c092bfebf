"""The classify flow under the Prefect test harness with MLflow on sqlite in tmp_path: run params, one metric
point per epoch, artifacts, the registered version and its alias, and predictions through the registry."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import ClassifyConfig

pytestmark = pytest.mark.usefixtures("prefect_harness")


def flow_cfg(csv, model, tmp_path, **over):
    raw = {
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 16,
                 "eval_fraction": 0.25},
        "train": {"model": model, "epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "output_dir": str(tmp_path / "out")},
        "tracking": {"registered_model": "tiny-sentiment", "experiment": "test-classify"},
    }
    for k, v in over.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return ClassifyConfig.model_validate(raw)


def test_classify_flow_tracks_registers_and_predicts(sentiment_csv, tiny_model_dir, tmp_path, isolated):
    from mlflow import MlflowClient

    from flows.classify import classify_flow
    from tasks.predict import predict

    cfg = flow_cfg(sentiment_csv, tiny_model_dir, tmp_path)
    out = classify_flow(cfg)

    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = c.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    # the MLflow run is named after the Prefect flow run and carries its id
    assert run.info.run_name.startswith("classify-") and run.data.tags["prefect.flow_run_id"]
    # the whole resolved config as params
    p = run.data.params
    assert p["train.epochs"] == "3" and p["data.dataset"] == sentiment_csv and p["engine"] == "manual"
    assert p["train.learning_rate"] == "0.01" and "device" in p
    # one point per epoch, step = epoch
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_f1"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/confusion_matrix.png", "eval/confusion_matrix.json", "eval/loss_curve.png"} <= arts

    # registered; the first version is champion
    mv = c.get_model_version_by_alias("tiny-sentiment", "champion")
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id and out["version"] == "1"
    # one evaluation per job: promotion scored the registered model exactly as the run's last epoch did
    scores = out["promotion"]["challenger_scores"]
    for name, key in (("f1", "eval_f1"), ("accuracy", "eval_accuracy"), ("loss", "eval_loss")):
        assert scores[name] == pytest.approx(out["metrics"][key], abs=1e-6), name

    # predictions through the registry return label names and scores
    res = predict("models:/tiny-sentiment@champion", ["a great wonderful film", "an awful boring mess"])
    assert [r["label"] for r in res] == ["positive", "negative"]
    assert all(0.5 < r["score"] <= 1.0 for r in res)

    # the same through the Prefect prediction flow
    from flows.predict import predict_flow

    assert [r["label"] for r in predict_flow("tiny-sentiment", ["an awful boring mess"], alias="champion")] == ["negative"]

    # the CLI in a fresh process loads the same model from the registry
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "predict", "--registered-model", "tiny-sentiment", "--version", "1",
         "--json", "a great wonderful film"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)[0]["label"] == "positive"

    # anyone can load it with plain pyfunc
    import mlflow

    df = mlflow.pyfunc.load_model("models:/tiny-sentiment/1").predict(["loved it , excellent"])
    assert df.iloc[0]["label"] == "positive"

    # a second run registers version 2 without losing version 1
    out2 = classify_flow(flow_cfg(sentiment_csv, tiny_model_dir, tmp_path, engine="trainer"))
    assert out2["version"] == "2"
    assert c.get_model_version("tiny-sentiment", "1").run_id == run.info.run_id
    assert set(c.get_run(out2["run_id"]).data.metrics) >= {"train_loss", "eval_loss", "eval_accuracy", "eval_f1"}


def test_bad_input_fails_before_training_and_records_nothing(tmp_path, tiny_model_dir, isolated):
    """Errors from the CLI name the problem and the fix; no MLflow run is created."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cases = [
        (["--dataset", str(tmp_path / "missing.csv")], "not found"),
        (["--max-length", "4096"], "position limit"),
        (["--epochs", "0"], "train.epochs"),
    ]
    for flags, expected in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "classify", "--model", tiny_model_dir, *flags],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 2, (flags, proc.stderr[-3000:])
        assert expected in proc.stderr, (flags, proc.stderr[-3000:])
    from mlflow import MlflowClient

    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in c.search_experiments()]
    assert not experiments or not c.search_runs(experiments)
