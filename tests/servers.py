"""A real `prefect server` for a test module and an `mlflow server` a test can stop and start again, built on the
integration tier's process helpers (tests/integration/_servers.py)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.integration._servers import VENV_BIN, Proc, clean_env, free_port, wait_http


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """Yields the API URL (…/api). Its own PREFECT_HOME (sqlite database) under `home`."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
    proc = Proc("prefect-server", [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env, home)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", proc)
        yield url
    finally:
        proc.stop()


class MlflowServer:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a fixed port, so it can restart in place."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> "MlflowServer":
        self.proc = Proc(
            "mlflow-server",
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), self.root,
        )
        wait_http(f"{self.url}/health", self.proc)
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
