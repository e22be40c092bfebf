"""When a RUNNING MLflow run counts as stale: a dead process on this host at once (a reused pid is not mistaken for
it), another host's run by its heartbeat or its Crashed/gone Prefect flow run; a live run never."""
from __future__ import annotations

import os
import socket
import subprocess
import time

from tasks import liveness as lv


def tags(**over) -> dict:
    return {**lv.liveness_tags(), **over}


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def no_prefect(_):
    raise AssertionError("Prefect must not be asked")


def test_same_host_pid_decides():
    assert lv.judge("r", "0", tags(), flow_run_state=no_prefect).alive is True
    v = lv.judge("r", "0", tags(**{lv.PID: str(dead_pid())}), flow_run_state=no_prefect)
    assert v.alive is False and "gone" in v.reason
    # this pid, but a different process start time: the pid was reused, the run's process is gone
    assert lv.judge("r", "0", tags(**{lv.PID_START: "1000.0"}), flow_run_state=no_prefect).alive is False
    # an old heartbeat does not matter while the process lives (a long evaluation, a tracking outage)
    assert lv.judge("r", "0", tags(**{lv.HEARTBEAT: "0"}), flow_run_state=no_prefect).alive is True


def test_other_host_by_heartbeat_and_prefect(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    now = time.time()
    other = tags(**{lv.HOST: "elsewhere", lv.PID: "1", lv.PREFECT_API: "http://prefect:4200/api",
                    "prefect.flow_run_id": "fr-1"})
    fresh = {**other, lv.HEARTBEAT: f"{now - 30:.0f}"}
    assert lv.judge("r", "0", fresh, now, flow_run_state=lambda _: "CRASHED").alive is True  # it still beats
    old = {**other, lv.HEARTBEAT: f"{now - lv.stale_seconds() - 1:.0f}"}
    assert lv.judge("r", "0", old, now, flow_run_state=lambda _: "RUNNING").alive is False
    missed = {**other, lv.HEARTBEAT: f"{now - 4 * lv.heartbeat_seconds():.0f}"}
    assert lv.judge("r", "0", missed, now, flow_run_state=lambda _: "RUNNING").alive is True
    assert lv.judge("r", "0", missed, now, flow_run_state=lambda _: "CRASHED").alive is False
    assert lv.judge("r", "0", missed, now, flow_run_state=lambda _: "GONE").alive is False
    # a flow run id from another Prefect server (or its temporary one) proves nothing here
    elsewhere = {**missed, lv.PREFECT_API: ""}
    assert lv.judge("r", "0", elsewhere, now, flow_run_state=no_prefect).alive is True


def test_runs_without_liveness_tags_are_left_alone():
    assert lv.judge("r", "0", {"mlflow.runName": "x"}, flow_run_state=no_prefect).alive is None


def test_heartbeat_tags_and_beats(monkeypatch):
    monkeypatch.setenv("FINETUNE_HEARTBEAT_SECONDS", "0.05")
    seen: list[dict] = []
    with lv.heartbeat("run", lambda rid, t: seen.append(dict(t))):
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    n = len(seen)
    time.sleep(0.2)
    assert len(seen) == n >= 3  # beats while the run is open, stops with it
    assert seen[0][lv.HOST] == socket.gethostname() and seen[0][lv.PID] == str(os.getpid())
    assert set(seen[1]) == {lv.HEARTBEAT}
