"""Integration tier, with authentication: a real MLflow server started by `MLFLOW_AUTH=basic bash mlflow/server.sh`
(admin password from a file, generated config owner-only) and a real `prefect server` with
PREFECT_SERVER_API_AUTH_STRING, both on loopback.

- without credentials MLflow answers 401, without the auth string Prefect refuses the client (REST and CLI);
- `finetune access` creates a training identity (EDIT on the experiment, MANAGE on the registered model) and a
  serving identity (READ on both);
- the training identity trains a tiny classifier through the CLI against both servers, registers it (champion),
  and promotes a second version; the serving identity predicts, and its promote is refused: exit 2, one line
  naming the missing permission, the registry unchanged;
- a Prefect worker with the auth string connects and polls its pool; one without it does not;
- the planted passwords and auth string appear nowhere in the run's params, tags, artifacts, the flow run's
  parameters, logs and artifacts, or the CLI output.

    .venv/bin/pytest tests/integration/test_auth.py    (about 2-3 minutes on 2 CPU cores)
"""
from __future__ import annotations

import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from _servers import ROOT, VENV_BIN, Proc, api, clean_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT, MODEL = "auth-classify", "auth-sentiment"
ADMIN_PW = "adm1n-" + secrets.token_hex(8)
TRAINER_PW = "tr41ner-" + secrets.token_hex(8)
SERVER_PW = "s3rver-" + secrets.token_hex(8)
PREFECT_AUTH = "prefect:" + secrets.token_hex(12)
SECRETS = (ADMIN_PW, TRAINER_PW, SERVER_PW, PREFECT_AUTH.split(":", 1)[1])
CLI = [sys.executable, "-m", "flows.cli"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def mlflow_auth(workdir):
    from tests.servers import MlflowServer

    pw_file = workdir / "admin.pw"
    pw_file.write_text(ADMIN_PW + "\n")
    pw_file.chmod(0o600)
    server = MlflowServer(workdir / "mlflow", MLFLOW_AUTH="basic", MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(pw_file))
    with server.running():
        yield server


@pytest.fixture(scope="module")
def prefect_auth(workdir):
    from tests.servers import prefect_server

    with prefect_server(workdir / "prefect-home", PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH,
                        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{workdir / 'prefect.db'}") as url:
        yield url


def env_as(workdir: Path, mlflow_url: str, user: str | None, password: str | None, prefect_url: str | None = None,
           auth_string: str | None = None, **extra) -> dict:
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_url, FINETUNE_CACHE_DIR=workdir / "cache",
                    FINETUNE_MLFLOW_RETRY_SECONDS=10, PREFECT_HOME=workdir / f"client-home-{user}", **extra)
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    if prefect_url:
        env["PREFECT_API_URL"] = prefect_url
    if auth_string:
        env["PREFECT_API_AUTH_STRING"] = auth_string
    return env


def cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "Warning" not in ln and "from starlette" not in ln]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    return lines[0]


# --- the launcher ---------------------------------------------------------------------------------------------


def test_server_sh_refuses_auth_without_password(workdir):
    env = clean_env(MLFLOW_AUTH="basic", MLFLOW_SERVER_DIR=str(workdir / "nopw"), MLFLOW_PORT=str(free_port()))
    p = subprocess.run(["bash", str(ROOT / "mlflow" / "server.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "admin password" in p.stderr and "no default" in p.stderr
    assert not (workdir / "nopw" / "basic_auth.ini").exists()


def test_server_sh_warns_on_non_loopback_without_auth(workdir):
    env = clean_env(MLFLOW_HOST="0.0.0.0", MLFLOW_SERVER_DIR=str(workdir / "warn"), MLFLOW_BIN="/bin/true")
    p = subprocess.run(["bash", str(ROOT / "mlflow" / "server.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "WARNING: binding to 0.0.0.0 without authentication" in p.stderr
    assert "champion" in p.stderr and "MLFLOW_AUTH=basic" in p.stderr


def test_generated_auth_config_is_owner_only(mlflow_auth):
    ini = mlflow_auth.root / "basic_auth.ini"
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    text = ini.read_text()
    assert "admin_username = admin" in text and "default_permission = READ" in text
    assert ADMIN_PW not in mlflow_auth.proc.tail(100_000)  # never echoed by the launcher


def test_mlflow_requires_credentials(mlflow_auth):
    url = f"{mlflow_auth.url}/api/2.0/mlflow/experiments/search"
    assert requests.get(url, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=("admin", "wrong"), timeout=30).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=("admin", ADMIN_PW), timeout=30).status_code == 200


def test_prefect_refuses_unauthenticated_clients(prefect_auth, workdir):
    assert requests.post(f"{prefect_auth}/flows/filter", json={}, timeout=30).status_code == 401
    api("POST", f"{prefect_auth}/flows/filter", json={},  # asserts a 2xx; retries a busy database's 503
        headers={"Authorization": f"Basic {__import__('base64').b64encode(PREFECT_AUTH.encode()).decode()}"})
    prefect = str(VENV_BIN / "prefect")
    env = clean_env(PREFECT_API_URL=prefect_auth, PREFECT_HOME=str(workdir / "prefect-cli"))
    bad = subprocess.run([prefect, "work-pool", "create", "auth-pool", "--type", "process"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    good = subprocess.run([prefect, "work-pool", "create", "auth-pool", "--type", "process"],
                          env={**env, "PREFECT_API_AUTH_STRING": PREFECT_AUTH}, capture_output=True, text=True,
                          timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr


def test_worker_connects_only_with_the_auth_string(prefect_auth, workdir):
    prefect = str(VENV_BIN / "prefect")
    env = clean_env(PREFECT_API_URL=prefect_auth, PREFECT_HOME=str(workdir / "prefect-worker"),
                    PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_HEARTBEAT_SECONDS="2")
    hdr = {"Authorization": f"Basic {__import__('base64').b64encode(PREFECT_AUTH.encode()).decode()}"}
    api("POST", f"{prefect_auth}/work_pools/", json={"name": "auth-worker-pool", "type": "process"}, headers=hdr)
    bad = subprocess.run([prefect, "worker", "start", "--pool", "auth-worker-pool", "--type", "process",
                          "--run-once"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    worker = Proc("auth-worker", [prefect, "worker", "start", "--pool", "auth-worker-pool", "--type", "process"],
                  {**env, "PREFECT_API_AUTH_STRING": PREFECT_AUTH}, workdir)
    try:
        deadline = time.monotonic() + 90
        workers: list = []
        while time.monotonic() < deadline and not workers:
            assert worker.alive(), worker.tail()
            time.sleep(2)
            r = requests.post(f"{prefect_auth}/work_pools/auth-worker-pool/workers/filter", json={}, headers=hdr,
                              timeout=30)
            workers = r.json() if r.status_code == 200 else []
        assert workers, f"the worker never checked in:\n{worker.tail()}"
    finally:
        worker.stop()


# --- identities, training, serving ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def identities(mlflow_auth, workdir):
    admin = env_as(workdir, mlflow_auth.url, "admin", ADMIN_PW)
    for user, pw in (("trainer", TRAINER_PW), ("server", SERVER_PW)):
        f = workdir / f"{user}.pw"
        f.write_text(pw + "\n")
        p = cli(["access", "create-user", "--user", user, "--password-file", str(f)], admin)
        assert p.returncode == 0, p.stderr
    grants = [("trainer", ["--experiment", EXPERIMENT], "EDIT"), ("trainer", ["--registered-model", MODEL], "MANAGE"),
              ("server", ["--experiment", EXPERIMENT, "--registered-model", MODEL], "READ")]
    for user, sel, perm in grants:
        p = cli(["access", "grant", "--user", user, *sel, "--permission", perm], admin)
        assert p.returncode == 0 and "granted" in p.stdout, p.stderr
    return {"admin": admin, "trainer": env_as(workdir, mlflow_auth.url, "trainer", TRAINER_PW),
            "server": env_as(workdir, mlflow_auth.url, "server", SERVER_PW)}


@pytest.fixture(scope="module")
def trained(identities, mlflow_auth, prefect_auth, workdir, tiny_model_dir, tmp_path_factory):
    """The training identity trains through the CLI, reporting to the authenticated Prefect server."""
    from conftest import write_sentiment_csv

    csv = write_sentiment_csv(tmp_path_factory.mktemp("auth-data"))
    env = env_as(workdir, mlflow_auth.url, "trainer", TRAINER_PW, prefect_auth, PREFECT_AUTH)
    p = cli(["classify", "--model", tiny_model_dir, "--dataset", csv, "--text-column", "review",
             "--label-column", "sentiment", "--max-length", "32", "--epochs", "1", "--batch-size", "8",
             "--no-freeze-embeddings", "--dropout", "null",
             "--learning-rate", "5e-3", "--warmup-ratio", "0", "--output-dir", str(workdir / "outputs"),
             "--experiment", EXPERIMENT, "--registered-model", MODEL, "--promotion-metric", "loss", "--json"],
            env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"proc": p, "env": env}


def _aliases(url: str) -> dict:
    r = requests.get(f"{url}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                     auth=("admin", ADMIN_PW), timeout=30)
    return {a["alias"]: a["version"] for a in r.json()["registered_model"].get("aliases", [])}


def test_training_identity_trains_registers_and_promotes(trained, identities, mlflow_auth):
    assert _aliases(mlflow_auth.url).get("champion") == "1"
    # a second version of the same model, registered by the training identity, then promoted by it
    code = ("from tasks import registry\n"
            f"mv = registry.get_version({MODEL!r}, '1')\n"
            f"print(registry.register_model(mv.source, {MODEL!r}, mv.run_id))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=identities["trainer"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "2", p.stderr
    p = cli(["promote", "--registered-model", MODEL, "--version", "2"], identities["trainer"])
    assert p.returncode == 0, p.stderr
    assert _aliases(mlflow_auth.url)["champion"] == "2"
    p = cli(["rollback", "--registered-model", MODEL], identities["trainer"])
    assert p.returncode == 0, p.stderr
    assert _aliases(mlflow_auth.url)["champion"] == "1"


def test_serving_identity_reads_but_cannot_promote(trained, identities, mlflow_auth):
    env = identities["server"]
    p = cli(["predict", "--registered-model", MODEL, "a great wonderful film"], env)
    assert p.returncode == 0 and p.stdout.split()[0] in ("positive", "negative"), p.stderr
    p = cli(["compare", "--registered-model", MODEL], env)
    assert p.returncode == 0 and "champion" in p.stdout, p.stderr
    before = _aliases(mlflow_auth.url)
    target = "2" if before["champion"] != "2" else "1"
    line = one_error_line(cli(["promote", "--registered-model", MODEL, "--version", target], env))
    assert "'server'" in line and "EDIT permission on registered model" in line and "403" in line
    assert _aliases(mlflow_auth.url) == before  # registry unchanged
    # no credentials at all, and a wrong password: one line each
    anon = dict(env)
    anon.pop("MLFLOW_TRACKING_USERNAME")
    anon.pop("MLFLOW_TRACKING_PASSWORD")
    assert "401" in one_error_line(cli(["predict", "--registered-model", MODEL, "a film"], anon))
    assert "401" in one_error_line(cli(["compare", "--registered-model", MODEL],
                                       {**env, "MLFLOW_TRACKING_PASSWORD": "wrong"}))


def test_serving_identity_runs_mlflow_models_serve(trained, identities, workdir):
    port = free_port()
    proc = Proc("auth-serve", [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                identities["server"], workdir)
    try:
        from _servers import wait_http

        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": ["a great wonderful film"]},
                          timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.stop()


# --- nothing secret recorded --------------------------------------------------------------------------------------


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_no_secret_in_params_tags_artifacts_or_logs(trained, mlflow_auth, prefect_auth, workdir, monkeypatch):
    import json

    result = json.loads(trained["proc"].stdout[trained["proc"].stdout.index("{"):])
    assert not _leaks(trained["proc"].stdout + trained["proc"].stderr)
    run_id = result["run_id"]
    auth = ("admin", ADMIN_PW)
    run = requests.get(f"{mlflow_auth.url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=auth,
                       timeout=30).json()["run"]
    assert run["data"]["params"] and run["data"]["tags"]
    assert not _leaks(json.dumps(run["data"])), "a secret in the run's params or tags"
    # every artifact file of the run (model, eval plots, metrics.json, config.yaml), as bytes
    import mlflow

    # monkeypatch restores all three afterwards: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which would
    # otherwise point every later test of the session at this (soon stopped) server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PW)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_auth.url)
    mlflow.set_tracking_uri(mlflow_auth.url)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(workdir / "download")))
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=result["logged_model_uri"],
                                                         dst_path=str(workdir / "download-model")))
    files = [f for d in (local, model_dir) for f in d.rglob("*") if f.is_file()]
    assert any(f.name == "config.yaml" for f in files) and any(f.suffix == ".safetensors" for f in files)
    assert not any(f.suffix in (".bin", ".pkl", ".pickle") for f in files), "weights must be safetensors"
    for f in files:
        data = f.read_bytes()
        assert not [s for s in SECRETS if s.encode() in data], f"a secret in artifact {f}"
    # the flow run: parameters, logs, artifacts
    import base64

    hdr = {"Authorization": f"Basic {base64.b64encode(PREFECT_AUTH.encode()).decode()}"}
    runs = api("POST", f"{prefect_auth}/flow_runs/filter", json={}, headers=hdr)
    fr = next(r for r in runs if r["name"].startswith("classify-"))
    assert fr["state_type"] == "COMPLETED"
    logs = api("POST", f"{prefect_auth}/logs/filter", json={"logs": {"flow_run_id": {"any_": [fr["id"]]}},
                                                                "limit": 200}, headers=hdr)
    arts = api("POST", f"{prefect_auth}/artifacts/filter",
               json={"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}}, headers=hdr)
    assert logs and arts
    blob = json.dumps([fr["parameters"], logs, arts])
    assert not _leaks(blob), "a secret in the flow run's parameters, logs or artifacts"


# --- finetune gc: another store's live run is left alone; gc as the training identity works ----------------------


def test_gc_of_another_store_leaves_a_live_run_alone(identities, mlflow_auth, workdir, tiny_model_dir,
                                                     tmp_path_factory):
    """A training identity trains against the MLflow server while `finetune gc --yes` runs against the local sqlite
    store on the same outputs/: the live run's checkpoints survive. Then gc as the training identity against the
    server: a run dir of another store and one whose run the server does not hold (the server answers 403 for it)
    are left alone, no error; once the run is killed, its dir goes."""
    import json

    from conftest import write_sentiment_csv

    csv = write_sentiment_csv(tmp_path_factory.mktemp("gc-data"), repeat=6)
    out = workdir / "shared-outputs"
    env = identities["trainer"]
    live = Proc("live-training", [*CLI, "classify", "--model", tiny_model_dir, "--dataset", csv,
                                  "--text-column", "review", "--label-column", "sentiment", "--max-length", "32",
                                  "--epochs", "500", "--batch-size", "4", "--checkpoint-every-steps", "2",
                                  "--output-dir", str(out), "--experiment", EXPERIMENT, "--registered-model", MODEL],
                env, workdir)
    try:
        deadline = time.monotonic() + 240
        run_dir = None
        while time.monotonic() < deadline and run_dir is None:
            assert live.alive(), live.tail()
            time.sleep(2)
            run_dir = next((d for d in (out / "classify").glob("*") if list(d.glob("checkpoints/step-*"))), None) \
                if (out / "classify").is_dir() else None
        assert run_dir is not None, f"no checkpoint in time:\n{live.tail()}"
        record = json.loads((run_dir / "run.json").read_text())
        assert record["tracking_store"] == mlflow_auth.url and record["run_id"] == run_dir.name
        assert TRAINER_PW not in (run_dir / "run.json").read_text()

        # gc of the local default store (another store), applied, while the run trains
        local = clean_env(FINETUNE_MLFLOW_STORE=str(workdir / "local-store"), FINETUNE_CACHE_DIR=workdir / "cache",
                          PREFECT_HOME=workdir / "gc-home")
        p = cli(["gc", "--output-dir", str(out), "--yes"], local)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"left alone        kept      {run_dir}" in p.stdout and mlflow_auth.url in p.stdout, p.stdout
        assert list(run_dir.glob("checkpoints/step-*")), "gc of another store removed a live run's checkpoints"

        # gc as the training identity against the server: the live run, a dir of the local store, and a dir whose
        # run id the server does not hold (no record; the server answers 403, not 404)
        from tasks import liveness

        other = out / "classify" / ("a" * 32)
        (other / "checkpoints").mkdir(parents=True)
        liveness.write_record(other, other.name, tracking_store=f"sqlite:///{workdir / 'local-store' / 'mlflow.db'}")
        unknown = out / "classify" / ("b" * 32)
        (unknown / "checkpoints").mkdir(parents=True)
        p = cli(["gc", "--output-dir", str(out), "--yes"], env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "error" not in (p.stdout + p.stderr).lower() and "403" not in p.stdout + p.stderr, p.stdout + p.stderr
        assert f"{other}" in p.stdout and f"{unknown}" in p.stdout and "no such run in this tracking store" in p.stdout
        for d in (run_dir, other, unknown):
            assert (d / "checkpoints").is_dir(), d
        assert live.alive(), live.tail()
    finally:
        live.stop(grace=120)  # SIGTERM: the run ends KILLED, its dir is gc's to remove
    status = requests.get(f"{mlflow_auth.url}/api/2.0/mlflow/runs/get", params={"run_id": run_dir.name},
                          auth=("admin", ADMIN_PW), timeout=30).json()["run"]["info"]["status"]
    assert status == "KILLED", status
    p = cli(["gc", "--output-dir", str(out), "--yes"], env)
    assert p.returncode == 0 and not run_dir.exists(), p.stdout + p.stderr


# --- logging into the UIs as a browser does -------------------------------------------------------------------------


def test_ui_logins_as_a_browser_sends_them(mlflow_auth, prefect_auth, identities):
    """docs/lifecycle.md's logins, as the browser sends them. MLflow: the UI page answers 401 with a Basic challenge
    (the browser's login prompt), then loads with the basic-auth header the prompt makes, and so do the UI's own
    data calls. Prefect: the UI page loads, tells the UI that auth is on (the Login box), and the Login box's
    `user:pass` string, sent as the UI sends it (`Authorization: Basic base64(string)`), passes its check."""
    import base64

    def basic(text: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}

    page = requests.get(f"{mlflow_auth.url}/", timeout=30)
    assert page.status_code == 401 and page.headers.get("WWW-Authenticate", "").startswith("Basic")
    page = requests.get(f"{mlflow_auth.url}/", headers=basic(f"trainer:{TRAINER_PW}"), timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower() and "mlflow" in page.text.lower()
    data = requests.get(f"{mlflow_auth.url}/ajax-api/2.0/mlflow/experiments/search", params={"max_results": 1},
                        headers=basic(f"trainer:{TRAINER_PW}"), timeout=30)
    assert data.status_code == 200, data.text

    root = prefect_auth.rsplit("/api", 1)[0]
    page = requests.get(f"{root}/", timeout=30)
    assert page.status_code == 200 and '<div id="app"' in page.text, page.text[:500]
    assert requests.get(f"{root}/ui-settings", timeout=30).json().get("auth") == "BASIC"  # the UI shows its Login box
    check = f"{prefect_auth}/admin/version"  # the Login box's check (authCheck in the UI)
    assert requests.get(check, timeout=30).status_code == 401
    assert requests.get(check, headers=basic("prefect:wrong"), timeout=30).status_code == 401
    assert requests.get(check, headers=basic(PREFECT_AUTH), timeout=30).status_code == 200
