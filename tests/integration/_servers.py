"""Helpers for the integration tier: free loopback ports, clean environments, subprocesses in their own process
group (so a server's workers go down with it), waiting for health endpoints, and small REST calls."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MLflow/Prefect settings (earlier tests in the same pytest process may
    have exported some, e.g. mlflow.set_registry_uri() does), with the venv's bin first on PATH (`mlflow models
    serve` execs `uvicorn` from PATH), offline Hugging Face, and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A subprocess with its output in a log file, started in a new session (its own process group)."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path, cwd: Path = ROOT):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._fh = self.log.open("ab")
        self.popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the whole group (the server and the workers it spawned), SIGKILL after `grace` seconds."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in the group (a worker's flow-run subprocess, uvicorn workers)
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()


def wait_http(url: str, proc: Proc, timeout: float = 120.0) -> None:
    """Until `url` answers 200; fails early (with the log) when the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{proc.name} did not answer {url} within {timeout:.0f} s:\n{proc.tail()}")


def run(cmd: list[str], env: dict, timeout: float = 180.0, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def api(method: str, url: str, **kwargs):
    """JSON REST call; a 503 (Prefect's answer to a busy sqlite database) is retried a few times."""
    for attempt in range(8):
        r = requests.request(method, url, timeout=30, **kwargs)
        if r.status_code != 503:
            break
        time.sleep(0.5 * (attempt + 1))
    assert r.status_code < 300, f"{method} {url}: {r.status_code} {r.text[:2000]}"
    return r.json() if r.content else None


def register_tiny_scorer(env: dict, root: Path, tiny_model_dir: str) -> None:
    """`it-scorer` version 1 as champion in the store `env` names, logged as the classify job logs its models (in a
    subprocess: the store's URI comes from `env`, as a server's or a worker's would)."""
    code = f"""
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from tasks import registry, tracking
m = AutoModelForSequenceClassification.from_pretrained({tiny_model_dir!r}, num_labels=2,
    id2label={{0: "negative", 1: "positive"}}, label2id={{"negative": 0, "positive": 1}})
m.save_pretrained({str(root / 'cls')!r}); AutoTokenizer.from_pretrained({tiny_model_dir!r}).save_pretrained({str(root / 'cls')!r})
run = tracking.start_run("it-score", "it-scorer", {{}})
v = registry.register_model(tracking.log_model(run, {str(root / 'cls')!r}, "text-classification"), "it-scorer", run)
tracking.end_run(run); registry.set_alias("it-scorer", "champion", v)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
