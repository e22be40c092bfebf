"""A real `prefect server` for a test module and an `mlflow server` a test can stop and start again, built on the
integration tier's process helpers (tests/integration/_servers.py)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.integration._servers import ROOT, VENV_BIN, Proc, clean_env, free_port, wait_http


@contextmanager
def prefect_server(home: Path, **env: str) -> Iterator[str]:
    """Yields the API URL (…/api). Its own PREFECT_HOME (sqlite database) under `home`; `env` adds settings."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    proc = Proc("prefect-server", [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], clean_env(PREFECT_HOME=str(home), **env), home)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", proc, timeout=180)
        yield url
    finally:
        proc.stop()


class MlflowServer:
    """A real `mlflow server` started by the project's launcher, mlflow/server.sh (sqlite backend, proxied
    artifacts, both under `root`), on a fixed port, so it can restart in place."""

    def __init__(self, root: Path, port: int | None = None, **env: str):
        """`env`: more settings for mlflow/server.sh (e.g. MLFLOW_AUTH=basic and the admin password)."""
        self.root, self.port, self.env = root, port or free_port(), env
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> "MlflowServer":
        env = clean_env(MLFLOW_PORT=self.port, MLFLOW_BACKEND_STORE_URI=f"sqlite:///{self.root / 'mlflow.db'}",
                        MLFLOW_ARTIFACTS_DESTINATION=str(self.root / "artifacts"), MLFLOW_WORKERS=1,
                        MLFLOW_SERVER_DIR=str(self.root), **self.env)
        self.proc = Proc("mlflow-server", ["bash", str(ROOT / "mlflow" / "server.sh")], env, self.root)
        wait_http(f"{self.url}/health", self.proc, timeout=120)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    @contextmanager
    def running(self) -> Iterator["MlflowServer"]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
