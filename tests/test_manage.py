"""`finetune compare / promote / rollback` against a real (sqlite) registry; the compare table as a Prefect
artifact; the monitoring callback outside and inside a Prefect run."""
from __future__ import annotations

import json
import os
import re

import pytest

from flows.cli import main


@pytest.fixture
def store(isolated, monkeypatch):
    # mlflow.set_registry_uri() exports MLFLOW_REGISTRY_URI: pin it to this test's database.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", os.environ["MLFLOW_TRACKING_URI"])
    return isolated


@pytest.fixture
def model(store):
    """`cmp-test` with three versions, each from a run with params and per-epoch metrics; v1 champion."""
    from flows.config import ClassifyConfig
    from tasks import registry, tracking

    name = "cmp-test"
    for i, lr in enumerate([1e-5, 3e-5, 5e-5], start=1):
        cfg = ClassifyConfig(train={"learning_rate": lr, "epochs": 2})
        run_id = tracking.start_run("cmp", f"run-{i}", cfg.flat())
        log = tracking.MetricsLogger(run_id)
        for epoch in (1, 2):
            log({"train_loss": 0.7 - 0.1 * epoch, "eval_loss": 0.6 - 0.01 * i, "eval_accuracy": 0.5 + 0.1 * i,
                 "eval_f1": 0.5 + 0.1 * i}, epoch)
        registry.register_model(f"runs:/{run_id}/model", name, run_id)
    registry.set_alias(name, registry.CHAMPION, "1")
    registry.set_alias(name, registry.CHALLENGER, "3")
    registry.set_version_tags(name, "3", {"promotion.decision": "rejected", "promotion.metric": "f1",
                                          "promotion.challenger_score": "0.8", "promotion.champion_score": "0.503998"})
    return name


def test_compare_table(model, capsys):
    from flows.manage import compare_rows

    rows = compare_rows(model)
    assert [r["version"] for r in rows] == [3, 2, 1]
    assert rows[0]["aliases"] == "challenger" and rows[2]["aliases"] == "champion" and rows[1]["aliases"] == ""
    assert rows[0]["eval_f1"] == pytest.approx(0.8) and rows[0]["train.learning_rate"] == "5e-05"
    assert rows[0]["promotion"] == "rejected (f1 0.8000 vs 0.5040)"  # one precision: no 0.503998 beside 0.5040
    assert main(["compare", "--registered-model", model]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["version", "aliases", "created"] and "eval_f1" in out[0]
    assert out[2].split()[:2] == ["3", "challenger"] and out[4].split()[:2] == ["1", "champion"]
    assert max(len(ln) for ln in out) <= 120  # fits a 120-column terminal
    assert out[2].split()[-1] == "rejected" and "data.dataset" not in out[0]
    decimals = {len(tok.split(".")[1]) for ln in out[2:] for tok in ln.split() if re.fullmatch(r"\d+\.\d+", tok)}
    assert decimals == {4}, out  # every metric cell at four decimals

    assert main(["compare", "--registered-model", model, "--wide"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert "data.dataset" in wide[0] and "run" in wide[0].split() and "rejected (f1 0.8000 vs 0.5040)" in wide[2]

    assert main(["compare", "--registered-model", model, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in as_json] == [3, 2, 1] and as_json[0]["run"] == "run-3"
    assert as_json[0]["eval_f1"] == pytest.approx(0.8) and as_json[0]["promotion"].startswith("rejected")


def test_compare_unknown_model(store, capsys):
    assert main(["compare", "--registered-model", "nope"]) == 2
    assert "not found" in capsys.readouterr().err


def test_promote_and_rollback_walk_the_champion_history(model, capsys):
    from tasks import registry

    assert main(["promote", "--registered-model", model, "--version", "2"]) == 0
    assert registry.aliases(model) == {"champion": "2", "previous-champion": "1", "challenger": "3"}
    assert main(["promote", "--registered-model", model, "--version", "3"]) == 0
    assert registry.aliases(model) == {"champion": "3", "previous-champion": "2"}
    assert main(["promote", "--registered-model", model, "--version", "3"]) == 0  # already champion: no change
    assert "already is the champion" in capsys.readouterr().out
    assert registry.aliases(model) == {"champion": "3", "previous-champion": "2"}

    assert main(["rollback", "--registered-model", model]) == 0
    assert "from version 3 to version 2" in capsys.readouterr().out
    assert registry.aliases(model) == {"champion": "2", "previous-champion": "1"}
    assert registry.get_version(model, "3").tags["finetune.rolled_back"] == "true"
    assert main(["rollback", "--registered-model", model]) == 0
    assert registry.aliases(model) == {"champion": "1"}
    assert main(["rollback", "--registered-model", model]) == 2  # v1 replaced nothing
    assert "nothing to roll back" in capsys.readouterr().err


def test_promote_errors(model, capsys):
    assert main(["promote", "--registered-model", model, "--version", "9"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["rollback", "--registered-model", "nope"]) == 2


def test_monitoring_callback_chains_outside_prefect():
    from flows.monitoring import MonitoredMetrics, artifact_key, train_task_run_name
    from flows.config import ClassifyConfig

    seen = []
    cb = MonitoredMetrics(lambda m, s: seen.append((m, s)), total_epochs=2, key="My Model_v2")
    cb({"train_loss": 0.5, "eval_f1": 0.75}, 1)
    assert seen == [({"train_loss": 0.5, "eval_f1": 0.75}, 1)]
    assert cb.rows == [{"epoch": 1, "train_loss": 0.5, "eval_f1": 0.75}] and cb.progress_id is None
    assert artifact_key("My Model_v2", "epoch-metrics") == "my-model-v2-epoch-metrics"
    cfg = ClassifyConfig(train={"model": "/tmp/x/tiny-bert", "epochs": 3}, data={"dataset": "/d/reviews.csv"})
    assert train_task_run_name({"cfg": cfg}) == "train-classify-tiny-bert-reviews.csv-manual-e3"


def test_artifacts_in_a_prefect_run(model, prefect_harness):
    """compare_flow publishes the versions table; MonitoredMetrics a progress and an epoch table artifact."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.manage import compare_flow
    from flows.monitoring import MonitoredMetrics, summary_artifact

    rows = compare_flow(model)
    assert len(rows) == 3

    @flow
    def fake_training():
        cb = MonitoredMetrics(None, total_epochs=2, key="monitor-test")
        for epoch in (1, 2):
            cb({"train_loss": 1.0 / epoch, "eval_loss": 0.9 / epoch}, epoch)
        summary_artifact("classify", model, _any_run_id(model), {"eval_f1": 0.8},
                         {"version": "3", "aliases": ["challenger"], "decision": "stays challenger"})
        return cb.progress_id

    progress_id = fake_training()
    with get_client(sync_client=True) as c:
        def latest(key):
            arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert arts, f"no artifact {key}"
            return sorted(arts, key=lambda a: a.created)[-1]

        table = latest("cmp-test-versions")
        assert table.type == "table" and '"challenger"' in table.data
        assert latest("monitor-test-progress").data == 100.0
        assert c.read_artifacts(artifact_filter=ArtifactFilter(id={"any_": [progress_id]}))[0].data == 100.0
        epochs = latest("monitor-test-epoch-metrics")
        assert '"epoch": 2' in epochs.data.replace('"epoch":2', '"epoch": 2')
        summary = latest("cmp-test-summary")
        assert "models:/cmp-test/3" in summary.data and "stays challenger" in summary.data


def _any_run_id(name: str) -> str:
    from tasks import registry

    return registry.get_version(name, "1").run_id


@pytest.mark.usefixtures("prefect_harness")
def test_compare_with_a_prefect_server_prints_only_its_table(model):
    """With PREFECT_API_URL set, compare runs a flow for the table artifact: its console log lines stay out."""
    import subprocess
    import sys
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "--registered-model", model], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert lines[0].split()[:2] == ["version", "aliases"] and len(lines) == 5, lines  # header, rule, 3 versions
