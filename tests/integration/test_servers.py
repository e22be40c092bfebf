"""Integration tier: a real `prefect server` and a real MLflow tracking server (mlflow/server.sh) on free loopback
ports. The classify retraining deployment from deployments/prefect.yaml goes onto a process work pool with
`prefect deploy` and runs through a `prefect worker`; then deployments/serve.py serves it instead. Runs are
triggered through Prefect's REST API with a tiny model and a tiny CSV, and everything is checked through the
servers' own REST APIs: flow runs completed, their task runs, logs and artifacts, MLflow runs with per-epoch
metrics and the loss curve, the registered challenger, and the champion alias moving only when it should.
Finally `mlflow models serve -m models:/NAME@champion --env-manager local` answers /invocations for a classifier
and a fill-mask model.

    .venv/bin/pytest -m integration          # this tier only (about 4 minutes on 2 CPU cores)
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from _servers import ROOT, VENV_BIN, Proc, api, clean_env, free_port, run, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "it-sentiment"
EXPERIMENT = "it-classify"
DEPLOYMENT = "retrain-classify"
FLOW = "classify-finetune"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# --- servers -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integration")


@pytest.fixture(scope="module")
def mlflow_server(workdir):
    """The project's launcher, mlflow/server.sh: sqlite backend, proxied artifact store, both in workdir."""
    from tests.servers import MlflowServer

    with MlflowServer(workdir).running() as server:
        yield server.url


@pytest.fixture(scope="module")
def prefect_server(workdir):
    from tests.servers import prefect_server as server

    # schedules turn into scheduled runs quickly
    with server(workdir / "prefect-server-home", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="3",
                PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{workdir / 'prefect.db'}") as url:
        yield url


@pytest.fixture(scope="module")
def client_env(workdir, prefect_server, mlflow_server):
    """What a worker, a served deployment and the CLI get: both servers, a private cache and Prefect home."""
    return clean_env(
        PREFECT_API_URL=prefect_server,
        PREFECT_HOME=workdir / "prefect-client-home",
        PREFECT_WORKER_QUERY_SECONDS=2,
        MLFLOW_TRACKING_URI=mlflow_server,
        FINETUNE_CACHE_DIR=workdir / "cache",
        FINETUNE_MLFLOW_RETRY_SECONDS=10,
    )


# --- Prefect and MLflow REST helpers ----------------------------------------------------------------------------


def run_config(workdir: Path, csv: str, model_dir: str, *, lr: float, epochs: int, margin: float) -> dict:
    return {
        "data": {"dataset": csv, "text_column": "review", "label_column": "sentiment", "max_length": 32},
        "train": {"model": model_dir, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "epochs": epochs, "learning_rate": lr, "batch_size": 4, "warmup_ratio": 0.0,
                  "output_dir": str(workdir / "outputs")},
        "tracking": {"registered_model": MODEL, "experiment": EXPERIMENT, "promotion_metric": "loss",
                     "promotion_margin": margin},
    }


def deployment(api_url: str) -> dict | None:
    """The deployment, or None while it does not exist (serve.py --replace deletes it, then creates it again)."""
    import requests

    r = requests.get(f"{api_url}/deployments/name/{FLOW}/{DEPLOYMENT}", timeout=30)
    if r.status_code in (404, 503):  # 503: Prefect's answer to a busy sqlite database; the caller polls
        return None
    assert r.status_code < 300, f"GET deployment: {r.status_code} {r.text[:2000]}"
    return r.json()


def trigger_and_wait(api_url: str, dep_id: str, config: dict, logs: list[Proc], timeout: float = 300) -> dict:
    """Creates a flow run of the deployment through the REST API and waits for a terminal state."""
    fr = api("POST", f"{api_url}/deployments/{dep_id}/create_flow_run", json={"parameters": {"config": config}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fr = api("GET", f"{api_url}/flow_runs/{fr['id']}")
        if fr["state_type"] in TERMINAL:
            break
        time.sleep(2)
    detail = "\n".join(f"--- {p.name}\n{p.tail(4000)}" for p in logs)
    assert fr["state_type"] == "COMPLETED", f"flow run {fr['name']} ended {fr['state_type']}:\n{detail}"
    return fr


def mlflow_get(url: str, endpoint: str, **params) -> dict:
    return api("GET", f"{url}/api/2.0/mlflow/{endpoint}", params=params)


def alias_version(url: str, alias: str) -> str | None:
    import requests

    r = requests.get(f"{url}/api/2.0/mlflow/registered-models/alias", params={"name": MODEL, "alias": alias}, timeout=30)
    return r.json()["model_version"]["version"] if r.status_code == 200 else None


def version_tags(url: str, version: str) -> dict[str, str]:
    mv = mlflow_get(url, "model-versions/get", name=MODEL, version=version)["model_version"]
    return {t["key"]: t["value"] for t in mv.get("tags", [])}


def mlflow_run_of(url: str, flow_run_id: str) -> dict:
    exp = mlflow_get(url, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = api("POST", f"{url}/api/2.0/mlflow/runs/search",
               json={"experiment_ids": [exp["experiment_id"]],
                     "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'"}).get("runs", [])
    assert len(runs) == 1, f"expected one MLflow run tagged with flow run {flow_run_id}, found {len(runs)}"
    return runs[0]


# --- the retraining lifecycle ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lifecycle(workdir, prefect_server, mlflow_server, client_env, tiny_model_dir, tmp_path_factory):
    """Deploy both jobs, then three classify retraining runs triggered through the API:
      A (worker): a model that learns a little         -> first version, beats the majority-class floor: champion
      B (worker): a good model, but promotion margin 5 -> better, not by the margin: stays challenger
      C (served): the same good model, margin 0        -> wins: champion moves to it"""
    csv = _sentiment_csv(tmp_path_factory.mktemp("data"))
    prefect = [str(VENV_BIN / "prefect")]
    out: dict = {"csv": csv}

    run([*prefect, "work-pool", "create", "finetune-process", "--type", "process"], client_env)
    run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], client_env)
    deps = api("POST", f"{prefect_server}/deployments/filter", json={})
    out["deployments"] = {d["name"]: d for d in deps}
    dep = out["deployment"] = out["deployments"][DEPLOYMENT]

    # The schedules make scheduled runs carrying their own parameters; keep them for the checks, then switch the
    # schedules off so that no real (MiniLM, minutes-long) nightly run can start during the test.
    def scheduled_runs(dep_ids):
        return api("POST", f"{prefect_server}/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"any_": dep_ids}, "state": {"type": {"any_": ["SCHEDULED"]}}}})

    deadline = time.monotonic() + 60
    scheduled: list = []
    while time.monotonic() < deadline and len({json.dumps(r["parameters"], sort_keys=True) for r in scheduled}) < 2:
        time.sleep(1)
        scheduled = scheduled_runs([dep["id"]])
    out["scheduled"] = scheduled
    for d in deps:
        for s in d["schedules"]:
            api("PATCH", f"{prefect_server}/deployments/{d['id']}/schedules/{s['id']}", json={"active": False})
    for r in scheduled_runs([d["id"] for d in deps]):
        api("DELETE", f"{prefect_server}/flow_runs/{r['id']}")

    worker = Proc("worker", [*prefect, "worker", "start", "--pool", "finetune-process", "--type", "process"],
                  client_env, workdir)
    try:
        out["A"] = trigger_and_wait(prefect_server, dep["id"],
                                    run_config(workdir, csv, tiny_model_dir, lr=5e-3, epochs=2, margin=0.0), [worker])
        out["after_A"] = {a: alias_version(mlflow_server, a) for a in ("champion", "challenger")}
        out["B"] = trigger_and_wait(prefect_server, dep["id"],
                                    run_config(workdir, csv, tiny_model_dir, lr=5e-3, epochs=6, margin=5.0), [worker])
        out["after_B"] = {a: alias_version(mlflow_server, a) for a in ("champion", "challenger")}
    finally:
        worker.stop()

    served = Proc("serve", [sys.executable, "deployments/serve.py", "--only", DEPLOYMENT, "--paused", "--replace"],
                  client_env, workdir)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # served: the deployment left the work pool
            assert served.alive(), served.tail()
            dep2 = deployment(prefect_server)
            if dep2 and dep2["id"] != dep["id"] and not dep2["work_pool_name"]:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"serve.py did not register the deployment:\n{served.tail()}")
        out["served_deployment"] = dep2
        out["C"] = trigger_and_wait(prefect_server, dep2["id"],
                                    run_config(workdir, csv, tiny_model_dir, lr=5e-3, epochs=6, margin=0.0), [served])
    finally:
        served.stop()
    return out


def _sentiment_csv(d: Path) -> str:
    from conftest import write_sentiment_csv

    return write_sentiment_csv(d)


def test_deployments_from_prefect_yaml(lifecycle):
    specs = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert set(lifecycle["deployments"]) == {d["name"] for d in specs} == {"retrain-classify", "retrain-mlm",
                                                                           "housekeeping", "sweep-classify",
                                                                           "score-nightly", "adapt-then-classify"}
    sweep = lifecycle["deployments"]["sweep-classify"]
    assert sweep["entrypoint"] == "flows/sweep.py:sweep_flow" and sweep["parameters"]["sweep"]["max_trials"] == 6
    mlm = lifecycle["deployments"]["retrain-mlm"]
    assert mlm["entrypoint"] == "flows/mlm.py:mlm_flow" and len(mlm["schedules"]) == 2
    dep = lifecycle["deployment"]
    assert dep["entrypoint"] == "flows/classify.py:classify_flow" and dep["work_pool_name"] == "finetune-process"
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    spec = next(d for d in specs if d["name"] == DEPLOYMENT)
    want = {s["cron"]: s["parameters"] for s in spec["schedules"]}
    assert {s["schedule"]["cron"]: s["parameters"] for s in dep["schedules"]} == want
    assert dep["parameters"] == spec["parameters"]
    # the scheduler turned both schedules into runs, each with its own schedule's parameters
    assert {json.dumps(r["parameters"], sort_keys=True) for r in lifecycle["scheduled"]} == {
        json.dumps(p, sort_keys=True) for p in want.values()}
    served = lifecycle["served_deployment"]
    assert {s["schedule"]["cron"]: s["parameters"] for s in served["schedules"]} == want
    assert not any(s["active"] for s in served["schedules"])  # --paused


@pytest.mark.parametrize("key", ["A", "B", "C"])
def test_flow_runs_show_progress_tables_and_summary(lifecycle, prefect_server, tiny_model_dir, key):
    fr = lifecycle[key]
    epochs = 2 if key == "A" else 6
    model = Path(tiny_model_dir).name
    # readable and unique: the job label, then a timestamp and a short id
    assert re.fullmatch(rf"classify-{re.escape(model)}-reviews\.csv-manual-e{epochs}-\d{{8}}-\d{{6}}-[0-9a-f]{{4}}", fr["name"])
    tasks = api("POST", f"{prefect_server}/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [fr["id"]]}}})
    names = {t["name"] for t in tasks}
    assert f"train-classify-{model}-reviews.csv-manual-e{epochs}" in names and f"register-{MODEL}" in names
    assert all(t["state_type"] == "COMPLETED" for t in tasks), {t["name"]: t["state_type"] for t in tasks}

    arts = api("POST", f"{prefect_server}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})
    by_key = {a["key"]: a for a in sorted(arts, key=lambda a: a["created"])}  # the latest of each key
    assert {f"{MODEL}-progress", f"{MODEL}-epoch-metrics", f"{MODEL}-summary", f"{MODEL}-promotion",
            f"{MODEL}-versions"} <= set(by_key)
    assert by_key[f"{MODEL}-progress"]["type"] == "progress" and by_key[f"{MODEL}-progress"]["data"] == 100
    table = json.loads(by_key[f"{MODEL}-epoch-metrics"]["data"])
    assert [r["epoch"] for r in table] == list(range(1, epochs + 1))
    assert {"train_loss", "eval_loss", "eval_accuracy", "eval_f1"} <= set(table[0])
    summary = by_key[f"{MODEL}-summary"]["data"]
    assert "/#/experiments/" in summary and f"models:/{MODEL}/" in summary and "Promotion" in summary
    versions = json.loads(by_key[f"{MODEL}-versions"]["data"])
    assert [r["version"] for r in versions] == list(range({"A": 1, "B": 2, "C": 3}[key], 0, -1))

    logs = api("POST", f"{prefect_server}/logs/filter", json={"logs": {"flow_run_id": {"any_": [fr["id"]]}}, "limit": 200})
    assert any(f"epoch {epochs}/{epochs}" in rec["message"] for rec in logs)


def test_mlflow_runs_have_epoch_metrics_and_loss_curve(lifecycle, mlflow_server):
    for key, epochs in (("A", 2), ("B", 6), ("C", 6)):
        run_ = mlflow_run_of(mlflow_server, lifecycle[key]["id"])
        rid = run_["info"]["run_id"]
        assert run_["info"]["status"] == "FINISHED"
        for metric in ("train_loss", "eval_loss", "eval_accuracy", "eval_f1"):
            hist = mlflow_get(mlflow_server, "metrics/get-history", run_id=rid, metric_key=metric)["metrics"]
            assert sorted(m["step"] for m in hist) == list(range(1, epochs + 1)), (key, metric)
        files = {f["path"] for f in mlflow_get(mlflow_server, "artifacts/list", run_id=rid, path="eval").get("files", [])}
        assert "eval/loss_curve.png" in files
        tags = {t["key"]: t["value"] for t in run_["data"]["tags"]}
        assert tags["registered_model"] == MODEL and tags["registered_version"] == {"A": "1", "B": "2", "C": "3"}[key]


def test_champion_moves_only_when_the_challenger_wins(lifecycle, mlflow_server):
    assert lifecycle["after_A"] == {"champion": "1", "challenger": None}  # first version above the floor
    t1 = version_tags(mlflow_server, "1")
    assert "beats the majority-class baseline" in t1["promotion.reason"]
    assert float(t1["promotion.challenger_score"]) < float(t1["promotion.baseline_score"])
    assert lifecycle["after_B"] == {"champion": "1", "challenger": "2"}  # better, not by the margin
    t2 = version_tags(mlflow_server, "2")
    assert t2["promotion.decision"] == "rejected" and t2["promotion.metric"] == "loss"
    assert float(t2["promotion.challenger_score"]) < float(t2["promotion.champion_score"])  # better...
    assert "margin" in t2["promotion.reason"]  # ...but not by more than 5.0
    # C won: champion moved, the replaced champion is remembered for rollback
    assert alias_version(mlflow_server, "champion") == "3"
    assert alias_version(mlflow_server, "previous-champion") == "1"
    assert alias_version(mlflow_server, "challenger") is None
    t3 = version_tags(mlflow_server, "3")
    assert t3["promotion.decision"] == "promoted" and t3["promotion.champion_version"] == "1"
    assert float(t3["promotion.challenger_score"]) < float(t3["promotion.champion_score"])


def test_compare_promote_rollback_cli_against_the_server(lifecycle, client_env):
    cli = [sys.executable, "-m", "flows.cli"]
    out = run([*cli, "compare", "--registered-model", MODEL], client_env).stdout.splitlines()
    assert out[2].split()[:2] == ["3", "champion"] and out[4].split()[:2] == ["1", "previous-champion"]
    run([*cli, "rollback", "--registered-model", MODEL], client_env)
    out = run([*cli, "compare", "--registered-model", MODEL], client_env).stdout.splitlines()
    assert out[4].split()[:2] == ["1", "champion"]
    run([*cli, "promote", "--registered-model", MODEL, "--version", "3"], client_env)
    out = run([*cli, "compare", "--registered-model", MODEL], client_env).stdout.splitlines()
    assert out[2].split()[:2] == ["3", "champion"]


# --- mlflow models serve -------------------------------------------------------------------------------------------


def _serve_and_invoke(model_uri: str, payload: dict, client_env: dict, workdir: Path, name: str) -> dict:
    import requests

    port = free_port()
    proc = Proc(name, [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                       "-h", "127.0.0.1", "-p", str(port)], client_env, workdir)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{proc.tail()}"
        return r.json()
    finally:
        proc.stop()


def test_mlflow_models_serve_classifier_champion(lifecycle, client_env, workdir):
    out = _serve_and_invoke(f"models:/{MODEL}@champion",
                            {"inputs": ["a great wonderful film", "an awful boring mess"]}, client_env, workdir,
                            "serve-classifier")
    assert [p["label"] for p in out["predictions"]] == ["positive", "negative"]
    assert all(0.5 < p["score"] <= 1.0 for p in out["predictions"])


def test_mlflow_models_serve_fill_mask(mlflow_server, client_env, workdir, tiny_model_dir):
    """A tiny BertForMaskedLM logged as a fill-mask pipeline through the server, registered, aliased champion."""
    code = (
        "from tasks import registry, tracking\n"
        "rid = tracking.start_run('it-mlm', 'tiny-fill-mask', {'job': 'mlm'})\n"
        f"uri = tracking.log_model(rid, {tiny_model_dir!r}, 'fill-mask', input_example=['This is a [MASK] movie!'])\n"
        "v = registry.register_model(uri, 'it-fill-mask', rid)\n"
        "registry.set_alias('it-fill-mask', 'champion', v)\n"
        "tracking.end_run(rid)\n"
    )
    run([sys.executable, "-c", code], client_env)
    out = _serve_and_invoke("models:/it-fill-mask@champion", {"inputs": ["This is a [MASK] movie!"]}, client_env,
                            workdir, "serve-fill-mask")
    preds = out["predictions"]
    assert len(preds) == 1 and isinstance(preds[0], str) and preds[0].strip()


def test_mlflow_models_serve_fill_mask_roberta(mlflow_server, client_env, workdir, family_model_dirs):
    """A non-BERT family (tiny RoBERTa, byte-level BPE, mask token `<mask>`) served the same way. The served model
    takes the model's own mask token: `[MASK]` is mapped only by `finetune predict`."""
    path = family_model_dirs["roberta"]
    code = (
        "from tasks import registry, tracking\n"
        "rid = tracking.start_run('it-mlm', 'tiny-fill-mask-roberta', {'job': 'mlm'})\n"
        f"uri = tracking.log_model(rid, {path!r}, 'fill-mask', input_example=['This is a <mask> movie!'])\n"
        "v = registry.register_model(uri, 'it-fill-mask-roberta', rid)\n"
        "registry.set_alias('it-fill-mask-roberta', 'champion', v)\n"
        "tracking.end_run(rid)\n"
    )
    run([sys.executable, "-c", code], client_env)
    out = _serve_and_invoke("models:/it-fill-mask-roberta@champion", {"inputs": ["This is a <mask> movie!"]},
                            client_env, workdir, "serve-fill-mask-roberta")
    preds = out["predictions"]
    assert len(preds) == 1 and isinstance(preds[0], str) and preds[0].strip()
