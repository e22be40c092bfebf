"""The kinds of classification (tasks/kinds/: multi-label, regression, sentence pairs, class weights) on data built
offline from the bundled reviews (tests/kinds_data.py), each through the flow -> registry -> predict -> pyfunc, on
a tiny config-built BERT. Tiny models on a few dozen reviews do not beat the floor reliably: these tests check the
plumbing (metrics, artifacts, the floor's numbers, what predict and pyfunc answer); the README's figures come
from the pretrained model."""
from __future__ import annotations

import json
import math
import os

import pytest

from flows.config import ClassifyConfig
from tasks.common import ConfigError

import kinds_data

pytestmark = pytest.mark.usefixtures("prefect_harness")


def cfg_for(path, model, tmp_path, name, **over):
    raw = {
        "data": {"dataset": path, "text_column": "review", "max_length": 24, "eval_fraction": 0.25},
        "train": {"model": model, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 2,
                  "batch_size": 8, "learning_rate": 5e-3, "warmup_ratio": 0.0, "output_dir": str(tmp_path / "out")},
        "tracking": {"registered_model": name, "experiment": f"test-{name}"},
    }
    for k, v in over.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return ClassifyConfig.model_validate(raw)


def history(run_id, key):
    from mlflow import MlflowClient

    return [m.value for m in MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, key)]


def version_tags(name, version):
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, version).tags


@pytest.mark.slow
def test_multi_label_flow_registry_predict_pyfunc(tmp_path, tiny_model_dir, isolated):
    import mlflow
    from mlflow import MlflowClient

    from flows.classify import classify_flow
    from tasks.predict import format_predictions, predict

    csv = kinds_data.write_multilabel(tmp_path, 48)
    cfg = cfg_for(csv, tiny_model_dir, tmp_path, "tiny-tags", problem="multi_label", threshold=0.4,
                  data={"label_column": "tags", "label_separator": "|"})
    out = classify_flow(cfg)
    m = out["metrics"]
    assert set(m) >= {"eval_loss", "eval_f1", "eval_micro_f1", "eval_subset_accuracy"} and "eval_accuracy" not in m
    assert all(0.0 <= m[k] <= 1.0 for k in ("eval_f1", "eval_micro_f1", "eval_subset_accuracy"))
    assert len(history(out["run_id"], "eval_micro_f1")) == 2
    # the floor: the majority label set, by macro-F1 (the default promotion metric)
    promo = out["promotion"]
    assert promo["metric"] == "f1" and promo["baseline"] == "majority-label-set"
    assert set(promo["baseline_scores"]) == {"f1", "micro_f1", "subset_accuracy", "loss"}
    # every text has 2 of 4 tags: predicting one fixed pair of tags gets half of the tags of the others right
    assert 0.0 < promo["baseline_scores"]["micro_f1"] < 1.0
    arts = {a.path for a in MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(out["run_id"], "eval")}
    assert "eval/per_label_f1.json" in arts and "eval/confusion_matrix.json" not in arts
    # predict: every label at or above the recorded threshold, highest first; pyfunc returns every label's score
    res = predict(f"models:/tiny-tags/{out['version']}", ["a great film", "awful"])
    assert all(r["threshold"] == 0.4 for r in res)
    for r in res:
        scores = [c["score"] for c in r["labels"]]
        assert scores == sorted(scores, reverse=True) and all(s >= 0.4 for s in scores)
        assert {c["label"] for c in r["labels"]} <= {"imdb", "rotten_tomatoes", "positive", "negative"}
    assert "\ta great film" in format_predictions(res)
    df = mlflow.pyfunc.load_model(f"models:/tiny-tags/{out['version']}").predict(["a great film"])
    cells = [c for c in df.iloc[0].tolist() if isinstance(c, dict)]
    assert sorted(c["label"] for c in cells) == ["imdb", "negative", "positive", "rotten_tomatoes"]
    assert all(0.0 <= c["score"] <= 1.0 for c in cells)
    got = {c["label"] for c in res[0]["labels"]}
    assert got == {c["label"] for c in cells if c["score"] >= 0.4}

    # a JSON list column, the Trainer engine, pos_weight from the train split's counts (logged), LoRA
    jsonl = kinds_data.write_multilabel(tmp_path, 48, as_json=True)
    cfg2 = cfg_for(jsonl, tiny_model_dir, tmp_path, "tiny-tags", problem="multi_label", engine="trainer",
                   class_weights="balanced", peft="lora", data={"label_column": "tags"},
                   train={"learning_rate": 1e-2})
    out2 = classify_flow(cfg2)
    assert out2["version"] == "2" and set(out2["metrics"]) >= {"eval_micro_f1", "eval_subset_accuracy"}
    run_arts = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).download_artifacts(out2["run_id"],
                                                                                    "eval/class_weights.json")
    weights = json.loads(open(run_arts).read())["pos_weight"]
    assert set(weights) == {"imdb", "negative", "positive", "rotten_tomatoes"}
    assert all(w == pytest.approx(1.0, abs=0.5) for w in weights.values())  # half the texts carry each tag
    res2 = predict(f"models:/tiny-tags/2", ["a great film"])
    assert res2[0]["threshold"] == 0.5 and isinstance(res2[0]["labels"], list)
