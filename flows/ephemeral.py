"""Prefect's temporary server, owned by the command that needs it. Without PREFECT_API_URL a flow call starts a
temporary API server as a subprocess (`SubprocessASGIServer`) and stops it at exit (atexit); a `kill -9` of the
command skips that and leaves the server running, orphaned. `own_temporary_server` starts that same server from the
main thread before any flow runs, with the kernel told to send it SIGTERM when its parent dies
(PR_SET_PDEATHSIG, Linux), and registers it as Prefect's default instance, so every Prefect client of the process
uses it instead of starting its own (as `prefect_test_harness` does)."""
from __future__ import annotations

import atexit
import functools
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


def _tied_server():
    """The process's temporary-server object, tied to this process (see module doc), or None when a server is
    configured (PREFECT_API_URL), one of Prefect's own already runs, this is not the main thread, or not Linux."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG follows the forking thread: only the main thread lives as long as the process
    from prefect.server.api.server import SubprocessASGIServer

    tied = _tied_server_class()
    existing = SubprocessASGIServer._instances.get(None)
    if isinstance(existing, tied):
        return existing
    if existing is not None and existing.running:
        return None
    SubprocessASGIServer._instances.pop(None, None)
    return tied()  # registered under the None key: SubprocessASGIServer() now returns it


@functools.cache
def _tied_server_class() -> type:
    from prefect.server.api import server as server_module
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        early = None  # the process `begin_temporary_server` launched, until `start` adopts it

        def _run_uvicorn_command(self):
            early, self.early = self.early, None
            if early is not None and early.poll() is None:
                return early  # launched ahead: start() only waits for its health check
            # Prefect builds the command and environment; only Popen gains the preexec_fn. The swap is local to
            # Prefect's server module and lasts for this one call, made from the main thread before any flow runs.
            real = server_module.subprocess
            popen = lambda *a, **kw: real.Popen(*a, preexec_fn=_die_with_parent(os.getpid()), **kw)  # noqa: E731
            server_module.subprocess = types.SimpleNamespace(**{**vars(real), "Popen": popen})
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

        def launch(self) -> None:
            if self.running or self.early is not None:
                return
            self.port = self.port or self.find_available_port()
            self.early = self._run_uvicorn_command()
            atexit.register(self.end_unused)

        def end_unused(self) -> None:
            """At exit, the launched process if the command stopped before using it (bad input): quietly."""
            early, self.early = self.early, None
            if early is not None and early.poll() is None:
                early.terminate()
                try:
                    early.wait(timeout=5)
                except Exception:
                    early.kill()

    return TiedServer


def begin_temporary_server() -> None:
    """Launches the temporary server's process now without waiting for it: it boots (4-6 s on 2 cores) while the
    command checks its config, model and data and sweeps stale runs; `own_temporary_server` then only waits for its
    health check. A command that stops on bad input ends the process at exit (and PDEATHSIG if it is killed)."""
    server = _tied_server()
    if server is not None:
        server.launch()


def own_temporary_server() -> str | None:
    """Starts (or finishes starting, after `begin_temporary_server`) Prefect's temporary server, tied to this
    process's life; returns its API URL, or None when Prefect's own start happens instead (see `_tied_server`)."""
    server = _tied_server()
    if server is None:
        return None
    server.start()
    return server.api_url
