"""A real `prefect server` for a test module, an `mlflow server` a test can stop and start again, and a throwaway
PostgreSQL server, built on the integration tier's process helpers (tests/integration/_servers.py)."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
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
        """`env`: more settings for mlflow/server.sh (e.g. MLFLOW_AUTH=basic and the admin password, or a
        postgresql:// MLFLOW_BACKEND_STORE_URI)."""
        self.root, self.port, self.env = root, port or free_port(), env
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> "MlflowServer":
        env = clean_env(**{"MLFLOW_PORT": self.port, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{self.root / 'mlflow.db'}",
                           "MLFLOW_ARTIFACTS_DESTINATION": str(self.root / "artifacts"), "MLFLOW_WORKERS": 1,
                           "MLFLOW_SERVER_DIR": str(self.root), **self.env})  # env may replace any default
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


def postgres_bin() -> Path | None:
    """The folder holding initdb/pg_ctl: $PG_BIN, Debian's /usr/lib/postgresql/<newest>/bin, or PATH."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


class PostgresServer:
    """A throwaway PostgreSQL server: initdb in a fresh temp dir, pg_ctl on a free loopback port, password
    (scram) logins over TCP. PostgreSQL refuses to run as root: as root the server's files belong to the
    `postgres` user and its commands run through `runuser -u postgres`. `stop()` shuts it down and deletes
    everything."""

    def __init__(self, user: str = "finetune"):
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL's initdb was not found: apt-get install postgresql (or set PG_BIN)")
        self.user, self.password = user, secrets.token_hex(12)
        self.port = free_port()
        self.base: Path | None = None

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        p = subprocess.run([*as_postgres, *cmd], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "LC_ALL": "C"})
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return p

    def start(self) -> "PostgresServer":
        # not under pytest's tmp_path: its parents are root-only, and the postgres user must reach the data dir
        self.base = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
        pw = self.base / "pw"
        pw.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(pw, "postgres", "postgres")
        data = self.base / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", self.user, f"--pwfile={pw}", "--no-locale",
                  "--encoding=UTF8", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        # fsync off: a test database need not survive a power cut
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.base / "server.log"), "-w", "-t", "120",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} -c fsync=off", "start",
                  timeout=180)
        return self

    def create_database(self, name: str) -> str:
        """Creates database `name` and returns its SQLAlchemy URL (postgresql://user:password@127.0.0.1:port/name)."""
        self._run(str(self.bin / "createdb"), "-h", str(self.base), "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        """One query through psql (unaligned, tuples only): what the database really holds."""
        return self._run(str(self.bin / "psql"), "-h", str(self.base), "-p", str(self.port), "-U", self.user,
                         "-d", database, "-At", "-c", sql).stdout.strip()

    def log(self) -> str:
        try:
            return (self.base / "server.log").read_text(errors="replace")[-6000:] if self.base else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self.base is None:
            return
        try:
            if (self.base / "data" / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.base / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    @contextmanager
    def running(self) -> Iterator["PostgresServer"]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
