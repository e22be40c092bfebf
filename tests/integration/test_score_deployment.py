"""`score-nightly` (deployments/prefect.yaml) on a real `prefect server`: `prefect deploy` accepts it onto the
process work pool, a `prefect worker` runs a flow run of it (parameters from the API, a tiny classifier in an
MLflow sqlite store the worker shares), and the run completes with the output file, its version metadata, the
progress and the summary artifacts."""
from __future__ import annotations

import csv
import json
import time

import pytest

from _servers import ROOT, VENV_BIN, Proc, api, clean_env, register_tiny_scorer, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_score_nightly_deploys_and_a_worker_run_completes(tmp_path, tiny_model_dir):
    from tests.servers import prefect_server

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_tiny_scorer(clean_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT)), tmp_path, tiny_model_dir)
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    for part in range(2):
        with (inbox / f"reviews-{part}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review_id", "text"])
            w.writerows([(f"{part}-{i}", "a great film" if i % 2 else "an awful mess") for i in range(15)])
    prefect = [str(VENV_BIN / "prefect")]
    with prefect_server(tmp_path / "prefect-home",
                        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}") as api_url:
        env = clean_env(PREFECT_API_URL=api_url, PREFECT_HOME=tmp_path / "client-home", PREFECT_WORKER_QUERY_SECONDS=2,
                        MLFLOW_TRACKING_URI=uri, FINETUNE_CACHE_DIR=tmp_path / "cache")
        run([*prefect, "work-pool", "create", "finetune-process", "--type", "process"], env)
        run([*prefect, "--no-prompt", "deploy", "--name", "score-nightly", "--prefect-file",
             "deployments/prefect.yaml"], env)
        dep = api("GET", f"{api_url}/deployments/name/score/score-nightly")
        assert dep["entrypoint"] == "flows/score.py:score_flow" and dep["work_pool_name"] == "finetune-process"
        assert dep["parameters"]["config"]["alias"] == "champion"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 1 * * *"]
        for s in dep["schedules"]:  # no real nightly run during the test
            api("PATCH", f"{api_url}/deployments/{dep['id']}/schedules/{s['id']}", json={"active": False})

        config = {**dep["parameters"]["config"], "registered_model": "it-scorer", "input": str(inbox),
                  "output": str(tmp_path / "scored" / "{date}.parquet"), "id_columns": ["review_id"],
                  "chunk_rows": 8}
        worker = Proc("worker", [*prefect, "worker", "start", "--pool", "finetune-process", "--type", "process"],
                      env, tmp_path)
        try:
            fr = api("POST", f"{api_url}/deployments/{dep['id']}/create_flow_run",
                     json={"parameters": {"config": config}})
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                fr = api("GET", f"{api_url}/flow_runs/{fr['id']}")
                if fr["state_type"] in TERMINAL:
                    break
                time.sleep(2)
            assert fr["state_type"] == "COMPLETED", worker.tail()
        finally:
            worker.stop()
        arts = api("POST", f"{api_url}/artifacts/filter",
                   json={"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})
    by_key = {a["key"]: a for a in arts}
    assert by_key["it-scorer-score-progress"]["data"] == 100.0
    assert "version 1" in by_key["it-scorer-score-summary"]["data"]
    out = next((tmp_path / "scored").glob("*.parquet"))
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["rows_in"] == meta["rows_out"] == 30 and meta["model"]["version"] == "1"
    import pyarrow.parquet as pq

    t = pq.read_table(out)
    assert t.column("review_id").to_pylist() == [f"{p}-{i}" for p in range(2) for i in range(15)]
    assert set(t.column("label").to_pylist()) <= {"negative", "positive"}
