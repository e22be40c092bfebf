"""Wiring shared by the training flows: the MLflow run's lifetime (honest end states, resume), run names, run dirs
and the summary text. The tail every run ends with (train, log, retention, publish) is flows/lifecycle.py."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Iterator

from flows.config import JobConfig
from tasks import liveness, tracking
from tasks.common import run_logger, stable_hash


def flow_run_info() -> tuple[str, str | None]:
    """Name and id of the current Prefect flow run (names the MLflow run; the id becomes a tag)."""
    try:
        from prefect.runtime import flow_run

        return flow_run.name or "local", flow_run.id
    except Exception:
        return "local", None


class Terminated(BaseException):
    """SIGTERM turned into an exception so the MLflow run is marked KILLED before the process exits."""


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"received signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def resume_key(cfg: JobConfig) -> str:
    """Identifies "the same job": the resolved config without the resume and retention flags. `--resume`
    continues the newest unfinished MLflow run with this key (and its checkpoints, kept in a folder named after the
    run id)."""
    return stable_hash(cfg.model_dump(exclude={"train": {"resume", "keep_checkpoints"}}))


@contextlib.contextmanager
def mlflow_run(cfg: JobConfig) -> Iterator[str]:
    """One MLflow run per flow run, FINISHED only when the body succeeds: FAILED on an exception, KILLED on
    SIGTERM, Ctrl-C or a Prefect cancellation. With `train.resume` an unfinished earlier run of the same config
    is continued (same run id, so its metrics continue without duplicates)."""
    name, fr_id = flow_run_info()
    key = resume_key(cfg)
    tags = {"prefect.flow_run_id": str(fr_id or ""), "prefect.flow_run_name": name, "finetune.job": cfg.job,
            "finetune.resume_key": key}
    run_id = None
    if cfg.train.resume:
        run_id = tracking.find_unfinished_run(cfg.experiment, "finetune.resume_key", key)
        if run_id:
            tracking.client().update_run(run_id, status="RUNNING")
            tracking.set_tags(run_id, {"prefect.flow_run_id": str(fr_id or ""), "finetune.resumed": "true"})
            run_logger(__name__).info("resuming MLflow run %s", run_id)
    if run_id is None:
        run_id = tracking.start_run(cfg.experiment, cfg.tracking.run_name or name, cfg.flat(), tags)
    try:
        # liveness tags and a heartbeat: a sweep closes this run if its process dies without a word (kill -9);
        # the run dir records the same, with its store and run id, so `finetune gc` of another store leaves it alone
        with liveness.heartbeat(run_id, tracking.set_tags, run_dir_for(cfg, run_id)):
            yield run_id
    except (KeyboardInterrupt, Terminated):
        tracking.end_run(run_id, "KILLED")
        raise
    except BaseException as e:
        from prefect.exceptions import TerminationSignal

        status = "KILLED" if isinstance(e, (TerminationSignal, SystemExit)) or "Cancel" in type(e).__name__ else "FAILED"
        with contextlib.suppress(Exception):
            tracking.set_tags(run_id, {"finetune.error": tracking.redact_uri(f"{type(e).__name__}: {e}")[:5000]})
        tracking.end_run(run_id, status)
        raise
    else:
        tracking.end_run(run_id, "FINISHED")


def job_label(cfg: JobConfig) -> str:
    """`<job>-<model>-<dataset>-<engine>-e<epochs>`: names flow runs, training task runs and MLflow runs."""
    def short(name: str) -> str:
        if str(name).startswith("models:/"):  # a registered version as the base: NAME@ALIAS or NAME-vVERSION
            return str(name)[len("models:/"):].replace("/", "-v")
        return str(name).rstrip("/").split("/")[-1] or str(name)

    return f"{cfg.job}-{short(cfg.train.model)}-{short(cfg.data.dataset)}-{getattr(cfg, 'engine', '')}-e{cfg.train.epochs}"


def unique_run_name(label: str) -> str:
    """`<label>-<YYYYmmdd-HHMMSS>-<4 hex>`: readable, sorted by start time, and never shared by two runs of the same
    config (which `--resume` tells apart by the `finetune.resume_key` tag, not by name)."""
    import datetime
    import secrets

    return f"{label}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def flow_run_name_for(config_cls: type[JobConfig]):
    """A `flow_run_name` callable for a flow whose parameter `config` is a `config_cls` (or its dict form): the
    job label and a timestamp; the MLflow run takes the same name."""
    def name() -> str:
        from prefect.runtime import flow_run

        cfg = flow_run.parameters.get("config")
        return unique_run_name(job_label(cfg if isinstance(cfg, config_cls) else config_cls.model_validate(cfg or {})))

    return name


def run_dir_for(cfg: JobConfig, key: str) -> Path:
    return Path(cfg.train.output_dir) / cfg.job / key


def summary_text(job: str, metrics: dict, run_id: str, registered: str, version: str | None, aliases: list[str],
                 predict_cmd: str, decision: str | None = None) -> str:
    lines = [f"== {job} finished =="]
    for k, v in metrics.items():
        if isinstance(v, float):
            lines.append(f"  {k:<22} {v:.4f}")
    lines.append(f"  MLflow run id          {run_id}")
    if version:
        lines.append(f"  registered model       {registered} version {version}" + (f" (aliases: {', '.join(aliases)})" if aliases else ""))
    if decision:
        lines.append(f"  promotion              {decision}")
    lines.append(f"  predict with:  {predict_cmd}")
    return "\n".join(lines)
