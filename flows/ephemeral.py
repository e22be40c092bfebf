"""Prefect's temporary server, owned by the command that needs it. Without PREFECT_API_URL a flow call starts a
temporary API server as a subprocess (`SubprocessASGIServer`) and stops it at exit (atexit); a `kill -9` of the
command skips that and leaves the server running, orphaned. `own_temporary_server` starts that same server from the
main thread before any flow runs, with the kernel told to send it SIGTERM when its parent dies
(PR_SET_PDEATHSIG, Linux), and registers it as Prefect's default instance, so every Prefect client of the process
uses it instead of starting its own (as `prefect_test_harness` does)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import types


def _die_with_parent(parent_pid: int):
    """A preexec_fn: SIGTERM this child when the thread that forked it (the main thread here) exits, i.e. when the
    command dies however it dies. Async-signal-safe: one prctl call, one getppid."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def own_temporary_server() -> str | None:
    """Starts Prefect's temporary server now, tied to this process's life; returns its API URL, or None when a
    server is configured (PREFECT_API_URL), one is already running in this process, or this is not Linux (Prefect's
    own start then happens as before)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG follows the forking thread: only the main thread lives as long as the process
    from prefect.server.api import server as server_module
    from prefect.server.api.server import SubprocessASGIServer

    existing = SubprocessASGIServer._instances.get(None)
    if existing is not None and existing.running:
        return None

    class TiedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            # Prefect builds the command and environment; only Popen gains the preexec_fn. The swap is local to
            # Prefect's server module and lasts for this one call, made from the main thread before any flow runs.
            real = server_module.subprocess
            popen = lambda *a, **kw: real.Popen(*a, preexec_fn=_die_with_parent(os.getpid()), **kw)  # noqa: E731
            server_module.subprocess = types.SimpleNamespace(**{**vars(real), "Popen": popen})
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

    SubprocessASGIServer._instances.pop(None, None)
    server = TiedServer()  # registered under the None key: SubprocessASGIServer() now returns it
    server.start()
    return server.api_url

