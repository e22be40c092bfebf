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
        "train": {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
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
    # one evaluation per job: promotion took the run's final metrics and only checked the registered model on the
    # probe batch; a full evaluation of the registered model gives the same numbers (what makes the reuse sound)
    from flows.promotion import eval_data_for_version
    from tasks.promotion import eval_fingerprint, evaluate_registered

    assert out["promotion"]["challenger_error"] is None
    scores = out["promotion"]["challenger_scores"]
    v1_cfg, data_path, tokenized_path = eval_data_for_version("tiny-sentiment", "1")
    full = evaluate_registered("models:/tiny-sentiment/1", v1_cfg.spec(), data_path, tokenized_path)
    for name, key in (("f1", "eval_f1"), ("accuracy", "eval_accuracy"), ("loss", "eval_loss")):
        assert scores[name] == pytest.approx(out["metrics"][key], abs=1e-6), name
        assert full[name] == pytest.approx(out["metrics"][key], abs=1e-6), name
    # ... and recorded on the version under the eval set's fingerprint, for when it is the champion
    fp = eval_fingerprint(v1_cfg.spec(), tokenized_path)
    tags = c.get_model_version("tiny-sentiment", "1").tags
    assert json.loads(tags["eval.scores"])[fp]["f1"] == pytest.approx(out["metrics"]["eval_f1"], abs=1e-9)

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

    df = mlflow.pyfunc.load_model("models:/tiny-sentiment/1").predict(["loved it , excellent",
                                                                      "loved it , excellent " * 200])
    assert df.iloc[0]["label"] == "positive"
    assert df.iloc[1]["label"] in ("negative", "positive")  # ~1,000 tokens: truncated as in training, not an error

    # a second run registers version 2 without losing version 1; the champion is not evaluated again (its scores
    # on this eval set are on its version), and nothing else is evaluated in full either
    import tasks.promotion as promotion

    full_evals = []
    real = promotion._evaluate
    promotion._evaluate = lambda *a, **k: full_evals.append(a[0]) or real(*a, **k)
    try:
        out2 = classify_flow(flow_cfg(sentiment_csv, tiny_model_dir, tmp_path, engine="trainer"))
    finally:
        promotion._evaluate = real
    assert out2["version"] == "2" and full_evals == []
    assert out2["promotion"]["champion_scores"]["f1"] == pytest.approx(out["metrics"]["eval_f1"], abs=1e-9)
    # the probe check tells models apart: version 2 does not reproduce version 1's trained weights
    from tasks.promotion import check_registered

    spec = v1_cfg.spec(["negative", "positive"])
    assert check_registered("models:/tiny-sentiment/1", spec, data_path, tokenized_path, out["probe"]) is None
    assert "does not reproduce" in check_registered("models:/tiny-sentiment/2", spec, data_path, tokenized_path,
                                                    out["probe"])
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


def test_constant_predictor_is_registered_but_not_champion(tmp_path, tiny_model_dir, isolated):
    """The quality floor, first version included: every text is the same, so whatever the model learns it predicts
    one class for all of them. On balanced eval data that ties the majority-class baseline (f1 1/3): it registers
    with no alias (not challenger, not champion), and the decision names the baseline."""
    from mlflow import MlflowClient

    from flows.classify import classify_flow

    csv = tmp_path / "same.csv"
    csv.write_text("review,sentiment\n" + "".join(f"the very same words,{'positive' if i % 2 else 'negative'}\n"
                                                  for i in range(24)))
    out = classify_flow(flow_cfg(str(csv), tiny_model_dir, tmp_path, tracking={"registered_model": "const-model"}))
    assert out["version"] == "1" and out["aliases"] == [] and not out["promoted"]
    assert "does not beat the majority-class baseline: f1 0.3333 vs baseline 0.3333" in out["decision"]
    assert "gets no alias (no challenger)" in out["decision"]
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert c.get_registered_model("const-model").aliases == {}
    tags = c.get_model_version("const-model", "1").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.baseline"] == "majority-class"
    assert float(tags["promotion.baseline_score"]) == pytest.approx(1 / 3, abs=1e-5)
    assert json.loads(tags["promotion.scores"])["baseline"]["accuracy"] == pytest.approx(0.5)
    assert out["promotion"]["baseline_score"] == pytest.approx(out["metrics"]["eval_f1"])


def test_integer_labels_1_2_are_names_end_to_end(tmp_path, tiny_model_dir, isolated):
    """Labels 1/2 (not 0/1): a 2-class model (no phantom '0'), named by the values; a perfect model scores
    f1 1.0; it beats the baseline, becomes champion and predicts "1"/"2"."""
    import csv as csvmod

    from mlflow import MlflowClient

    from conftest import NEGATIVE, POSITIVE
    from flows.classify import classify_flow
    from tasks.predict import predict

    p = tmp_path / "stars.csv"
    with p.open("w", newline="") as f:
        w = csvmod.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows([(t, 2) for t in POSITIVE] * 3 + [(t, 1) for t in NEGATIVE] * 3)
    out = classify_flow(flow_cfg(str(p), tiny_model_dir, tmp_path, tracking={"registered_model": "stars"}))
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    tags = c.get_run(out["run_id"]).data.tags
    assert tags["num_labels"] == "2" and tags["label_names"] == "1,2"
    assert out["metrics"]["eval_accuracy"] == 1.0 and out["metrics"]["eval_f1"] == 1.0
    assert out["promoted"] and "champion" in out["aliases"]
    assert "beats the majority-class baseline 0.3333" in out["decision"]
    res = predict("models:/stars@champion", ["a great wonderful film", "an awful boring mess"])
    assert [r["label"] for r in res] == ["2", "1"]
