"""Integration tier, PostgreSQL stores: one real PostgreSQL server (initdb + pg_ctl in a temp dir on a free
loopback port; tests/servers.py) holds three databases: MLflow's runs and registry (`mlflow/server.sh` with a
postgresql:// MLFLOW_BACKEND_STORE_URI), MLflow's basic-auth users (MLFLOW_AUTH_DATABASE_URI) and the Prefect
server's (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...). A tiny classifier trains through the CLI
against both servers; the run, its per-epoch metrics, the registered version, the champion alias and the flow run
are checked through the servers' APIs *and* in PostgreSQL's own tables (no sqlite store anywhere), and the
champion predicts from the registry (`models:/NAME@champion`) what the trained model dir predicts.

    .venv/bin/pytest -m "" tests/integration/test_postgres.py     (about 2 minutes on 2 CPU cores)
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from _servers import ROOT, api, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT, MODEL = "pg-classify", "pg-sentiment"
ADMIN_PW = "adm1n-" + secrets.token_hex(8)
TEXTS = ["a great wonderful film", "an awful boring mess", "loved the excellent cast"]


def test_server_sh_names_the_missing_driver_before_starting(tmp_path):
    """A database URI whose SQLAlchemy driver is missing, or the `postgres://` scheme SQLAlchemy refuses: one
    `error:` line (password redacted), exit 2, no server started."""
    for var, uri, want in (
        ("MLFLOW_BACKEND_STORE_URI", "postgres://u:pw-secret@db/mlflow", "write postgresql://u:***@db/mlflow"),
        ("MLFLOW_BACKEND_STORE_URI", "mysql://u:pw-secret@db/mlflow", "needs the database driver MySQLdb"),
    ):
        env = clean_env(**{var: uri, "MLFLOW_SERVER_DIR": str(tmp_path), "MLFLOW_PORT": "1"})
        p = subprocess.run(["bash", str(ROOT / "mlflow" / "server.sh")], env=env, capture_output=True, text=True,
                           timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
        assert want in lines[0] and "pw-secret" not in p.stderr and var in lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("postgres")


@pytest.fixture(scope="module")
def pg():
    from tests.servers import PostgresServer, postgres_bin

    if postgres_bin() is None:  # .ci/run installs Debian's postgresql package when it is missing
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql, or set PG_BIN)")
    with PostgresServer().running() as server:
        for db in ("mlflow", "mlflow_auth", "prefect"):
            server.create_database(db)
        yield server


@pytest.fixture(scope="module")
def mlflow_pg(pg, workdir):
    """mlflow/server.sh on PostgreSQL, with basic auth whose users also live in PostgreSQL."""
    from tests.servers import MlflowServer

    pw_file = workdir / "admin.pw"
    pw_file.write_text(ADMIN_PW + "\n")
    pw_file.chmod(0o600)
    server = MlflowServer(workdir / "mlflow", MLFLOW_BACKEND_STORE_URI=pg.url("mlflow"), MLFLOW_AUTH="basic",
                          MLFLOW_AUTH_DATABASE_URI=pg.url("mlflow_auth"),
                          MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(pw_file))
    try:
        with server.running():
            yield server
    except AssertionError as e:  # the server did not come up: PostgreSQL's side of the story too
        raise AssertionError(f"{e}\n--- postgresql log\n{pg.log()}") from None


@pytest.fixture(scope="module")
def prefect_pg(pg, workdir):
    from tests.servers import prefect_server

    with prefect_server(workdir / "prefect-home",
                        PREFECT_API_DATABASE_CONNECTION_URL=pg.url("prefect", driver="asyncpg")) as url:
        yield url


@pytest.fixture(scope="module")
def trained(mlflow_pg, prefect_pg, workdir, tiny_model_dir, tmp_path_factory):
    from conftest import write_sentiment_csv

    csv = write_sentiment_csv(tmp_path_factory.mktemp("pg-data"))
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_pg.url, MLFLOW_TRACKING_USERNAME="admin",
                    MLFLOW_TRACKING_PASSWORD=ADMIN_PW, PREFECT_API_URL=prefect_pg,
                    PREFECT_HOME=workdir / "client-home", FINETUNE_CACHE_DIR=workdir / "cache",
                    FINETUNE_MLFLOW_RETRY_SECONDS=10)
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "classify", "--model", tiny_model_dir, "--dataset", csv,
         "--text-column", "review", "--label-column", "sentiment", "--max-length", "32", "--epochs", "2",
         "--batch-size", "8", "--learning-rate", "5e-3", "--warmup-ratio", "0",
         "--output-dir", str(workdir / "outputs"), "--experiment", EXPERIMENT, "--registered-model", MODEL,
         "--promotion-metric", "loss", "--keep-checkpoints", "--json"],  # keep: compared below,
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"result": json.loads(p.stdout[p.stdout.index("{"):]), "env": env}


def mlflow_get(server, endpoint: str, **params) -> dict:
    r = requests.get(f"{server.url}/api/2.0/mlflow/{endpoint}", params=params, auth=("admin", ADMIN_PW), timeout=30)
    assert r.status_code == 200, f"{endpoint}: {r.status_code} {r.text[:2000]}"
    return r.json()


def test_run_metrics_version_and_alias_through_the_server(trained, mlflow_pg):
    run_id = trained["result"]["run_id"]
    run = mlflow_get(mlflow_pg, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.epochs"] == "2" and params["tracking.registered_model"] == MODEL
    for metric in ("train_loss", "eval_loss", "eval_accuracy"):
        hist = mlflow_get(mlflow_pg, "metrics/get-history", run_id=run_id, metric_key=metric)["metrics"]
        assert sorted(m["step"] for m in hist) == [1, 2], metric
    mv = mlflow_get(mlflow_pg, "model-versions/get", name=MODEL, version="1")["model_version"]
    assert mv["run_id"] == run_id and mv["status"] == "READY"
    alias = mlflow_get(mlflow_pg, "registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert alias["version"] == "1"
    # without credentials: refused (the auth app reads its users from PostgreSQL)
    r = requests.get(f"{mlflow_pg.url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30)
    assert r.status_code == 401


def test_everything_is_in_postgresql(trained, mlflow_pg, prefect_pg, pg):
    run_id = trained["result"]["run_id"]
    assert pg.psql("mlflow", "select status from runs") == "FINISHED"
    assert pg.psql("mlflow", "select run_uuid from runs") == run_id
    assert pg.psql("mlflow", "select count(*) from metrics where key = 'eval_loss'") == "2"
    assert pg.psql("mlflow", f"select version, run_id from model_versions where name = '{MODEL}'") == f"1|{run_id}"
    assert pg.psql("mlflow", f"select alias, version from registered_model_aliases where name = '{MODEL}'") \
        == "champion|1"
    assert pg.psql("mlflow_auth", "select username, is_admin from users") == "admin|t"
    assert pg.psql("prefect", "select state_type from flow_run") == "COMPLETED"
    assert int(pg.psql("prefect", "select count(*) from task_run where state_type = 'COMPLETED'")) >= 3
    # and the flow run through Prefect's API (served from that database)
    runs = api("POST", f"{prefect_pg}/flow_runs/filter", json={})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    # nothing fell back to sqlite: the server dir holds only the auth config and the proxied artifacts
    assert not list(mlflow_pg.root.rglob("*.db"))


def test_champion_predicts_from_the_registry(trained):
    """models:/NAME@champion, loaded from the PostgreSQL-backed registry through the server, answers what the
    trained model dir answers locally."""
    code = (
        "import json, sys\n"
        "from tasks.adapters import load_pipeline\n"
        "from tasks.predict import predict_classification\n"
        f"texts = {TEXTS!r}\n"
        f"remote = predict_classification('models:/{MODEL}@champion', texts)\n"
        "local = load_pipeline(sys.argv[1], 'text-classification')(texts)\n"
        "print(json.dumps({'remote': remote, 'local': local}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code, trained["result"]["model_dir"]], cwd=ROOT, env=trained["env"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-5000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r["label"] for r in out["remote"]] == [r["label"] for r in out["local"]]
    assert {r["label"] for r in out["remote"]} <= {"positive", "negative"}
    assert out["remote"][0]["score"] == pytest.approx(out["local"][0]["score"], rel=1e-4)
