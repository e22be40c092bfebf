"""Fault injection, for real: training subprocesses killed with SIGKILL and SIGTERM mid-training, a real
`mlflow server` stopped and restarted during training, a size-limited output directory, two concurrent
retraining runs of the same registered model. Checks the Prefect state, the MLflow run status and metrics, and
the registry aliases afterwards. Slow: a real Prefect server for the module, a subprocess per training run."""
from __future__ import annotations

import glob
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import write_sentiment_csv
from tests.integration._servers import api, clean_env
from tests.servers import MlflowServer, prefect_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
METRICS = ("train_loss", "eval_loss", "eval_accuracy", "eval_f1")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-faults")) as url:
        yield url


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory) -> str:
    """640 rows: long enough epochs to interrupt mid-way."""
    return write_sentiment_csv(tmp_path_factory.mktemp("data"), repeat=40)


def env_for(tmp: Path, prefect_api: str, tracking_uri: str | None = None, **extra) -> dict:
    return clean_env(
        PYTHONPATH=str(ROOT), PREFECT_API_URL=prefect_api,
        MLFLOW_TRACKING_URI=tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}?timeout=60",
        FINETUNE_CACHE_DIR=str(tmp / "cache"), FINETUNE_LOCK_DIR=str(tmp / "locks"),
        FINETUNE_MLFLOW_STORE=str(tmp / "store"), FINETUNE_MLFLOW_RETRY_SECONDS="120", **extra,
    )


def classify_cmd(csv_path, model, out, *extra) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "classify", "--dataset", csv_path, "--text-column", "review",
            "--label-column", "sentiment", "--model", model, "--max-length", "16", "--batch-size", "4",
            "--learning-rate", "5e-3", "--epochs", "3", "--output-dir", str(out),
            "--no-freeze-embeddings", "--dropout", "null", *extra]  # a model built from a config: its random embeddings must train, and it needs its dropout (README: Speed)


def run_cli(cmd, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def wait_for(pattern: str, proc: subprocess.Popen, timeout=300) -> None:
    t0 = time.monotonic()
    while not glob.glob(pattern):
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {pattern} appeared")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(pattern)
        time.sleep(0.02)


def mlflow_client(env):
    from mlflow import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def runs_of(c, experiment):
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], order_by=["start_time ASC"]) if exp else []


def flow_run_states(prefect_api: str) -> list[str]:
    return [fr["state"]["type"] for fr in api("POST", f"{prefect_api}/flow_runs/filter", json={"limit": 200})]


@pytest.mark.parametrize("engine", ["manual", "trainer"])
def test_sigkill_mid_training_then_resume(engine, big_csv, tiny_model_dir, tmp_path, prefect_api):
    env = env_for(tmp_path, prefect_api)
    out = tmp_path / "out"
    cmd = classify_cmd(big_csv, tiny_model_dir, out, "--engine", engine, "--experiment", "faults",
                       "--registered-model", "faults-model", "--checkpoint-every-steps", "10")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = str(out / "classify" / "*" / ("checkpoints/step-*" if engine == "manual" else "trainer/checkpoint-*"))
    wait_for(ckpts, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL

    c = mlflow_client(env)
    [killed] = runs_of(c, "faults")
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to say more
    assert len(c.get_metric_history(killed.info.run_id, "eval_loss")) < 3
    assert not c.search_model_versions("name='faults-model'")

    resumed = run_cli(cmd + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [run] = runs_of(c, "faults")  # the same run continued, no duplicate
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags.get("finetune.resumed") == "true"
    for k in METRICS:
        assert [m.step for m in c.get_metric_history(run.info.run_id, k)] == [1, 2, 3], k
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss_step")]
    assert len(steps) == len(set(steps)) >= 20  # the step-level series: no duplicate point after the resume

    # an uninterrupted run with the same seed ends with the same metrics
    ref = run_cli(classify_cmd(big_csv, tiny_model_dir, tmp_path / "ref", "--engine", engine, "--experiment",
                               "reference", "--registered-model", "ref-model", "--checkpoint-every-steps", "10"), env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    [ref_run] = runs_of(c, "reference")
    for k in METRICS:
        np.testing.assert_allclose(run.data.metrics[k], ref_run.data.metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert str(c.get_model_version_by_alias("faults-model", "champion").version) == "1"


def test_sigterm_marks_run_killed_and_flow_crashed(big_csv, tiny_model_dir, tmp_path, prefect_api):
    env = env_for(tmp_path, prefect_api)
    out = tmp_path / "out"
    before = flow_run_states(prefect_api)
    cmd = classify_cmd(big_csv, tiny_model_dir, out, "--experiment", "term", "--registered-model", "term-model",
                       "--checkpoint-every-steps", "10", "--epochs", "6")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(str(out / "classify" / "*" / "checkpoints" / "step-*"), proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    c = mlflow_client(env)
    [run] = runs_of(c, "term")
    assert run.info.status == "KILLED", output[-3000:]
    assert not c.search_model_versions("name='term-model'")
    after = flow_run_states(prefect_api)
    assert len(after) == len(before) + 1
    new = set(range(len(after)))  # the newest run (any order): one of them must be crashed/cancelled/failed
    assert sum(s in ("CRASHED", "CANCELLED", "FAILED") for s in after) == sum(
        s in ("CRASHED", "CANCELLED", "FAILED") for s in before) + 1, (after, new)


def test_mlflow_server_restart_during_training(big_csv, tiny_model_dir, tmp_path, prefect_api):
    server = MlflowServer(tmp_path / "mlflow-server").start()
    try:
        env = env_for(tmp_path, prefect_api, tracking_uri=server.url)
        cmd = classify_cmd(big_csv, tiny_model_dir, tmp_path / "out", "--experiment", "outage",
                           "--registered-model", "outage-model", "--epochs", "8")
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        c = mlflow_client(env)
        t0 = time.monotonic()
        while True:  # wait for the first epoch's metrics, then take the server down
            runs = runs_of(c, "outage")
            if runs and c.get_metric_history(runs[0].info.run_id, "eval_loss"):
                break
            assert proc.poll() is None and time.monotonic() - t0 < 300
            time.sleep(0.2)
        server.stop()
        time.sleep(6)
        # MLflow's REST client retries with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES), our _retry wraps it
        assert proc.poll() is None, "training must survive the outage"
        server.start()
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        [run] = runs_of(c, "outage")
        assert run.info.status == "FINISHED"
        for k in METRICS:
            assert [m.step for m in c.get_metric_history(run.info.run_id, k)] == list(range(1, 9)), k
        assert str(c.get_model_version_by_alias("outage-model", "champion").version) == "1"
    finally:
        server.stop()


def test_size_limited_output_dir_fails_cleanly(big_csv, tiny_model_dir, tmp_path, prefect_api):
    """RLIMIT_FSIZE = 2 MiB in the training process: the first checkpoint cannot be written, as on a full disk.
    The MLflow store is a server (its files are not limited); the registry keeps its champion."""
    with MlflowServer(tmp_path / "mlflow-server").running() as server:
        env = env_for(tmp_path, prefect_api, tracking_uri=server.url)
        base = ["--experiment", "disk", "--registered-model", "disk-model", "--epochs", "1"]
        ok = run_cli(classify_cmd(big_csv, tiny_model_dir, tmp_path / "ok", *base), env)
        assert ok.returncode == 0, ok.stderr[-3000:]
        # warm the dataset cache so only training writes large files
        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, resource.RLIM_INFINITY))

        proc = subprocess.run(classify_cmd(big_csv, tiny_model_dir, tmp_path / "full", *base, "--seed", "1"),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit)
        assert proc.returncode != 0
        assert "could not write checkpoint" in proc.stdout + proc.stderr
        c = mlflow_client(env)
        runs = runs_of(c, "disk")
        assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
        assert [str(v.version) for v in c.search_model_versions("name='disk-model'")] == ["1"]
        assert str(c.get_model_version_by_alias("disk-model", "champion").version) == "1"
        assert not glob.glob(str(tmp_path / "full" / "classify" / "*" / "checkpoints" / ".*.tmp-*"))


def test_concurrent_retraining_of_one_model(big_csv, tiny_model_dir, tmp_path, prefect_api):
    env = env_for(tmp_path, prefect_api)
    base = ["--experiment", "conc", "--registered-model", "conc-model", "--epochs", "1"]
    first = run_cli(classify_cmd(big_csv, tiny_model_dir, tmp_path / "o0", *base), env)
    assert first.returncode == 0, first.stderr[-3000:]
    procs = [subprocess.Popen(classify_cmd(big_csv, tiny_model_dir, tmp_path / f"o{i}", *base, "--seed", str(i)),
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
        assert "database is locked" not in o
    c = mlflow_client(env)
    versions = sorted(int(v.version) for v in c.search_model_versions("name='conc-model'"))
    assert versions == [1, 2, 3]
    assert [r.info.status for r in runs_of(c, "conc")] == ["FINISHED"] * 3
    champion = int(c.get_model_version_by_alias("conc-model", "champion").version)
    assert champion in versions
    # each challenger got a complete, recorded decision (promotions did not interleave)
    for v in (2, 3):
        tags = c.get_model_version("conc-model", str(v)).tags
        assert any(k.startswith("promotion") for k in tags), tags


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_sigkill_of_a_cli_run_leaves_no_process(big_csv, tiny_model_dir, tmp_path):
    """No PREFECT_API_URL: the CLI starts Prefect's temporary server as its child; `kill -9` of the CLI must not
    leave it (or anything else) running."""
    import psutil

    env = clean_env(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect-home"),
                    MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=60",
                    FINETUNE_CACHE_DIR=str(tmp_path / "cache"), FINETUNE_LOCK_DIR=str(tmp_path / "locks"),
                    FINETUNE_MLFLOW_STORE=str(tmp_path / "store"))
    out = tmp_path / "out"
    proc = subprocess.Popen(classify_cmd(big_csv, tiny_model_dir, out, "--experiment", "orphans", "--registered-model",
                                         "orphans-model", "--checkpoint-every-steps", "10", "--epochs", "6"),
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(str(out / "classify" / "*" / "checkpoints" / "step-*"), proc)
    children = _descendants(proc.pid)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "the temporary Prefect server is a child"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    _, alive = psutil.wait_procs(children, timeout=60)  # they go with their parent, not after some timeout
    assert not alive, [" ".join(p.cmdline()) for p in alive]


def test_dead_worker_run_becomes_crashed_and_killed(big_csv, tiny_model_dir, tmp_path, prefect_api):
    """A deployment served by deployments/serve.py (which creates the zombie automation) is killed mid-run with
    SIGKILL, serving process and flow-run subprocess alike (a lost machine). The automation marks the Prefect flow
    run Crashed once its heartbeats stop; `finetune gc` then closes the MLflow run KILLED."""
    import psutil
    import yaml

    env = env_for(tmp_path, prefect_api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")
    out = tmp_path / "out"
    config = {"data": {"dataset": big_csv, "text_column": "review", "label_column": "sentiment", "max_length": 16},
              "train": {"model": tiny_model_dir, "freeze_embeddings": False, "dropout": None, "group_by_length": False, "batch_size": 4, "learning_rate": 5e-3, "epochs": 50,
                        "checkpoint_every_steps": 10, "output_dir": str(out)},
              "tracking": {"experiment": "zombie", "registered_model": "zombie-model"}}
    spec = tmp_path / "prefect.yaml"
    spec.write_text(yaml.safe_dump({"deployments": [{"name": "zombie-classify", "entrypoint":
                                                     "flows/classify.py:classify_flow",
                                                     "parameters": {"config": config}}]}))
    from tests.integration._servers import Proc

    served = Proc("serve", [sys.executable, "deployments/serve.py", "--prefect-file", str(spec), "--crash-after",
                            "60"], env, tmp_path)
    try:
        t0 = time.monotonic()
        while True:
            r = requests.get(f"{prefect_api}/deployments/name/classify-finetune/zombie-classify", timeout=10)
            if r.status_code == 200:
                break  # else 404 (not yet served) or 503 (busy database): poll again
            assert served.alive() and time.monotonic() - t0 < 300, served.tail()
            time.sleep(1)
        autos = api("POST", f"{prefect_api}/automations/filter", json={})
        assert [a["name"] for a in autos].count("finetune-flows: crash zombie flow runs") == 1
        # api() retries a 503: Prefect's answer when its sqlite database is busy (seen in CI on this very call)
        flow_run_id = api("POST", f"{prefect_api}/deployments/{r.json()['id']}/create_flow_run", json={})["id"]
        wait_for(str(out / "classify" / "*" / "checkpoints" / "step-*"), served.popen)
        victims = [psutil.Process(served.popen.pid), *_descendants(served.popen.pid)]
        for p in victims:
            p.kill()
        psutil.wait_procs(victims, timeout=30)

        c = mlflow_client(env)
        [run] = runs_of(c, "zombie")
        assert run.info.status == "RUNNING"  # nothing could say otherwise
        t0, state = time.monotonic(), None
        while time.monotonic() - t0 < 400:  # 60 s without a heartbeat, plus the trigger's evaluation period
            state = api("GET", f"{prefect_api}/flow_runs/{flow_run_id}")["state"]["type"]
            if state == "CRASHED":
                break
            time.sleep(3)
        assert state == "CRASHED"

        gc = run_cli([sys.executable, "-m", "flows.cli", "gc", "--output-dir", str(out), "--yes"], env)
        assert gc.returncode == 0, gc.stdout[-3000:] + gc.stderr[-3000:]
        run = c.get_run(run.info.run_id)
        assert run.info.status == "KILLED" and "gone" in run.data.tags["finetune.killed_reason"]
        assert not (out / "classify" / run.info.run_id).exists()  # and gc removed what it left behind
    finally:
        served.stop()
