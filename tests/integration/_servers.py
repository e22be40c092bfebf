"""Helpers for the integration tier: free loopback ports, clean environments, subprocesses in their own process
group (so a server's workers go down with it), waiting for health endpoints, and small REST calls."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def two_node_ray_cluster(env: dict, root: Path, prefix: str) -> Iterator[str]:
    """A real two-node Ray cluster on this machine: `ray start --head`, then a second `ray start --address` node
    once the head's session exists; loopback, one CPU each, token authentication from `env`. Yields the head's
    address when Ray counts both nodes alive; both are stopped on exit."""
    ray = str(VENV_BIN / "ray")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths have a length limit
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block",
              "--temp-dir", str(temp)]
    head = Proc("ray-head", [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                             "--ray-client-server-port", str(free_port()), *common], env, root)
    node2 = None
    try:
        address = f"127.0.0.1:{port}"
        probe = "import ray; ray.init(address={a!r}); print(sum(1 for n in ray.nodes() if n['Alive']))"
        deadline = time.monotonic() + 180
        nodes = 0
        while time.monotonic() < deadline:
            assert head.alive(), head.tail()
            if node2 is None and (temp / "session_latest").exists():
                node2 = Proc("ray-node2", [ray, "start", "--address", address, *common], env, root)
            if node2 is not None:
                p = subprocess.run([sys.executable, "-c", probe.format(a=address)], env=env, capture_output=True,
                                   text=True, timeout=120)
                nodes = int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else 0
                if nodes == 2:
                    break
            time.sleep(2)
        assert nodes == 2, f"{head.tail()}\n{node2.tail() if node2 else ''}"
        yield address
    finally:
        for proc in (node2, head):
            if proc is not None:
                proc.stop()
