"""Jobs are recipes: a third job registered from one new module (tests/jobs/topics.py) runs through the generic
training flow, the registry, promotion, `predict` and the CLI without any other file knowing about it."""
import csv
import os
import random

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def topics_csv(tmp_path):
    from tests.jobs.topics import TOPICS

    rows = [(t, topic) for topic, texts in TOPICS.items() for t in texts] * 4
    random.Random(0).shuffle(rows)
    p = tmp_path / "topics.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "topic"])
        w.writerows(rows)
    return str(p)


def test_a_third_job_runs_through_flow_registry_and_predict(topics_csv, tiny_model_dir, tmp_path, isolated, capsys):
    from mlflow import MlflowClient

    import tests.jobs.topics  # noqa: F401  (registers the job: the only thing the user adds)
    from flows.cli import main
    from flows.config import build_config, config_class
    from flows.train import run_job
    from tasks import jobs
    from tasks.predict import predict

    assert "topics" in jobs.all_jobs()
    assert main(["topics", "--help"]) == 0 and "3-class topic classifier" in capsys.readouterr().out

    cfg = build_config(config_class("topics"), None, {
        "data": {"dataset": topics_csv, "max_length": 16, "eval_fraction": 0.25},
        "train": {"model": tiny_model_dir, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": 4, "batch_size": 8, "warmup_ratio": 0.0,
                  "output_dir": str(tmp_path / "out")},
        "tracking": {"experiment": "toy-topics"},
    })
    out = run_job(cfg)

    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = c.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["job"] == "topics"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "eval_topic_coverage")] == [1, 2, 3, 4]
    assert run.data.tags["label_names"] == "food,sports,tech"
    # registered under the job's default name, champion, tagged with the job; promotion used the job's metric,
    # scored by the job's own evaluation: the same number the run logged
    mv = c.get_model_version_by_alias("toy-topics", "champion")
    assert mv.run_id == run.info.run_id and mv.tags["job"] == "topics"
    assert out["promotion"]["metric"] == "accuracy"
    assert out["promotion"]["challenger_scores"]["accuracy"] == pytest.approx(out["metrics"]["eval_accuracy"], abs=1e-6)
    assert out["metrics"]["eval_accuracy"] >= 0.75

    res = predict("models:/toy-topics@champion", ["the striker scored a goal", "spicy noodles and bread"])
    assert [r["label"] for r in res] == ["sports", "food"]
