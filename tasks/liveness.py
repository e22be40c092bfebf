"""Is the process behind a RUNNING MLflow run still alive? MLflow never closes a run whose process died (kill -9, a
lost machine: mlflow#10510), so each training run carries liveness tags: its host, pid and the pid's start time,
and a heartbeat timestamp that a daemon thread refreshes while the run is open. A sweep (the next `finetune`
command, `finetune gc`) marks runs whose process is gone KILLED:

- same host: the pid is checked directly (with its start time, so a reused pid is not mistaken for the run): a dead
  process is stale at once, a live one is never touched;
- another host: the heartbeat is stale after FINETUNE_HEARTBEAT_STALE_SECONDS (default 600), or sooner when the
  run's Prefect flow run is Crashed or gone (checked only against the Prefect server the run itself reported to)
  and the heartbeat has missed three beats.

A run without liveness tags (written before they existed, or by another tool) is left alone.

The same identity is also written into the run's output dir (`run.json`, `RECORD`), with the tracking store and
run id it belongs to: `finetune gc` reads it to leave alone the dirs of runs that live in another store (another
server, another sqlite file), and to judge a dir whose store cannot answer by its own liveness record."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tasks import tracking
from tasks.tracking import redact_uri, store_id

log = logging.getLogger(__name__)

HOST, PID, PID_START, HEARTBEAT, PREFECT_API = (
    "finetune.host", "finetune.pid", "finetune.pid_start", "finetune.heartbeat", "finetune.prefect_api")
FLOW_RUN_ID = "prefect.flow_run_id"
RECORD = "run.json"  # in each run dir: tracking store, run id, host, pid, pid start, heartbeat, ended


def heartbeat_seconds() -> float:
    return float(os.environ.get("FINETUNE_HEARTBEAT_SECONDS", "60"))


def stale_seconds() -> float:
    return float(os.environ.get("FINETUNE_HEARTBEAT_STALE_SECONDS", "600"))


def _pid_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def prefect_api() -> str:
    """The Prefect server this process reports to ("" for Prefect's temporary server, which dies with it)."""
    url = os.environ.get("PREFECT_API_URL", "")
    return redact_uri(url.rstrip("/")) if url else ""


def liveness_tags() -> dict[str, str]:
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: str(pid), PID_START: f"{_pid_start(pid) or 0:.3f}",
            HEARTBEAT: f"{time.time():.0f}", PREFECT_API: prefect_api()}


def write_record(run_dir: str | Path, run_id: str, **fields) -> dict:
    """Writes (atomically) the run dir's record: the tracking store (no credential in it) and run id it belongs
    to, and this process's liveness (`fields` update an existing record, e.g. the heartbeat)."""
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = read_record(run_dir) or {}
    if rec.get("run_id") != run_id or not fields:
        tags = liveness_tags()
        rec = {"tracking_store": store_id(), "run_id": run_id, "host": tags[HOST], "pid": int(tags[PID]),
               "pid_start": float(tags[PID_START]), "heartbeat": float(tags[HEARTBEAT]), "started": time.time()}
    rec.update(fields)
    tmp = path.with_name(f".{RECORD}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)
    return rec


def read_record(run_dir: str | Path) -> dict | None:
    """The run dir's record, or None (a dir written before records existed, or an unreadable one)."""
    try:
        rec = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("tracking_store") else None


def record_verdict(rec: dict, now: float | None = None) -> tuple[bool, str, float]:
    """(alive, why, last sign of life) from a run dir's own record: a process that ended the run (`ended`) or is
    gone (same host: its pid, with its start time; another host: no heartbeat for stale_seconds()) is dead."""
    now = time.time() if now is None else now
    if rec.get("ended"):
        return False, "its process ended the run", float(rec["ended"])
    tags = {HOST: str(rec.get("host", "")), PID: str(rec.get("pid", 0)), PID_START: str(rec.get("pid_start", 0)),
            HEARTBEAT: str(rec.get("heartbeat", 0))}
    v = judge(str(rec.get("run_id", "")), "", tags, now, flow_run_state=lambda _: None)
    return bool(v.alive), v.reason, float(rec.get("heartbeat") or rec.get("started") or 0)


@contextlib.contextmanager
def heartbeat(run_id: str, set_tags: Callable[[str, dict], None], run_dir: str | Path | None = None) -> Iterator[None]:
    """Tags the run with this process's identity, then refreshes `finetune.heartbeat` every heartbeat_seconds()
    from a daemon thread until the block ends (a missed beat, e.g. a tracking outage, is only logged). With
    `run_dir`, the same identity and beats go to the dir's record (`RECORD`), and its end is written there."""
    set_tags(run_id, liveness_tags())
    if run_dir is not None:
        write_record(run_dir, run_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_seconds()):
            now = f"{time.time():.0f}"
            try:
                if run_dir is not None:
                    write_record(run_dir, run_id, heartbeat=float(now))
                set_tags(run_id, {HEARTBEAT: now})
            except Exception as e:  # the next beat tries again; staleness takes minutes of misses
                log.debug("heartbeat of MLflow run %s failed: %s", run_id, e)

    t = threading.Thread(target=beat, name=f"mlflow-heartbeat-{run_id[:8]}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        if run_dir is not None:
            with contextlib.suppress(OSError):
                write_record(run_dir, run_id, ended=time.time())


@dataclass
class Verdict:
    run_id: str
    experiment_id: str
    alive: bool | None  # None: no liveness tags, left alone
    reason: str


def prefect_flow_run_state(flow_run_id: str) -> str | None:
    """The flow run's state type (e.g. "CRASHED"), "GONE" when the server does not know it, None when it cannot be
    asked (no PREFECT_API_URL, server down)."""
    if not flow_run_id or not os.environ.get("PREFECT_API_URL"):
        return None
    try:
        from prefect import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as c:
            try:
                fr = c.read_flow_run(flow_run_id)
            except ObjectNotFound:
                return "GONE"
            return fr.state.type.value if fr.state else None
    except Exception as e:
        log.debug("could not read Prefect flow run %s: %s", flow_run_id, e)
        return None


def judge(run_id: str, experiment_id: str, tags: dict[str, str], now: float | None = None,
          flow_run_state: Callable[[str], str | None] = prefect_flow_run_state) -> Verdict:
    """Alive, stale (with the reason) or unknown, for one RUNNING run's tags."""
    now = time.time() if now is None else now
    if PID not in tags or HOST not in tags:
        return Verdict(run_id, experiment_id, None, "no liveness tags")
    pid, host = int(tags[PID]), tags[HOST]
    if host == socket.gethostname():
        started = _pid_start(pid)
        recorded = float(tags.get(PID_START) or 0)
        if started is not None and (not recorded or abs(started - recorded) < 2.0):
            return Verdict(run_id, experiment_id, True, f"process {pid} is alive")
        return Verdict(run_id, experiment_id, False, f"its process {pid} on {host} is gone")
    age = now - float(tags.get(HEARTBEAT) or 0)
    if age > stale_seconds():
        return Verdict(run_id, experiment_id, False, f"no heartbeat from {host} for {age:.0f} s")
    if age > 3 * heartbeat_seconds() and tags.get(PREFECT_API) and tags.get(PREFECT_API) == prefect_api():
        state = flow_run_state(tags.get(FLOW_RUN_ID, ""))
        if state in ("CRASHED", "GONE"):
            what = "Crashed" if state == "CRASHED" else "gone"
            return Verdict(run_id, experiment_id, False,
                           f"its Prefect flow run is {what} and {host} last beat {age:.0f} s ago")
    return Verdict(run_id, experiment_id, True, f"heartbeat from {host} {age:.0f} s ago")


def running_runs(experiment_ids: list[str] | None = None) -> list:
    """RUNNING runs of the given experiments (every active experiment when None)."""
    from mlflow.entities import ViewType

    c = tracking.client()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    return list(c.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000))


def sweep_stale_runs(experiments: list[str] | None = None, apply: bool = True) -> list[Verdict]:
    """Marks RUNNING runs whose process is gone KILLED (tagged `finetune.killed_reason`); returns the stale
    verdicts (with apply=False, what would be marked). `experiments`: names (None: every experiment)."""
    c = tracking.client()
    ids = None
    if experiments is not None:
        ids = [e.experiment_id for e in (c.get_experiment_by_name(n) for n in experiments) if e is not None]
    stale = []
    for run in running_runs(ids):
        v = judge(run.info.run_id, run.info.experiment_id, run.data.tags)
        if v.alive is False:
            stale.append(v)
            if apply:
                sweep_one(v)
    return stale


def sweep_one(v: Verdict) -> None:
    """Closes one stale run: KILLED, with the reason as the tag `finetune.killed_reason`."""
    tracking.set_tags(v.run_id, {"finetune.killed_reason": f"stale: {v.reason}"})
    tracking.client().set_terminated(v.run_id, "KILLED")
    log.info("marked MLflow run %s KILLED: %s", v.run_id, v.reason)


def sweep_quietly(experiments: list[str] | None) -> None:
    """The cheap sweep before a training command: never fails the command."""
    try:
        for v in sweep_stale_runs(experiments):
            print(f"note: marked stale MLflow run {v.run_id} KILLED ({v.reason})")
    except Exception as e:
        log.debug("stale-run sweep skipped: %s", e)
